"""The README's main demo, in quick mode: it trains and writes its outputs."""

import json
import os

from zojax import demo


def test_quick_demo_trains_every_method(tmp_path):
  logs = demo.main(['--quick', '--out', str(tmp_path)])
  final = {log['method']: log['test_accuracy'][-1] for log in logs}
  # 10 classes: chance is 0.1. Quick mode spends 30k evaluations per ZO method.
  assert final['first-order Adam'] > 0.85
  assert final['RGE q=16 + Adam'] > 0.6
  assert final['CGE (all coords) + Adam'] > 0.5
  for log in logs:
    if 'first-order' not in log['method']:
      assert log['evals'][-1] <= 30_000
      assert log['evals'] == sorted(log['evals'])
  assert os.path.getsize(tmp_path / 'demo.png') > 10_000
  saved = json.loads((tmp_path / 'demo.json').read_text())
  assert [log['method'] for log in saved['logs']] == list(final)
