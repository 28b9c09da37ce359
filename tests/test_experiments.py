"""Smoke runs of the benchmark scripts in quick mode (they must keep working)."""

import importlib.util
import json
import os
import pathlib
import re
import sys

import jax
import jax.extend.random  # pylint: disable=unused-import
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The scripts import their shared helpers (experiments/harness.py) as they
# do when run from that folder.
sys.path.insert(0, os.path.join(REPO, 'experiments'))


def _load(name):
  path = os.path.join(REPO, 'experiments', f'{name}.py')
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_bench_parallel_quick(tmp_path):
  out = tmp_path / 'bench_parallel.json'
  _load('bench_parallel').main(['--quick', '--methods', 'rge', '--repeats',
                                '1', '--devices', '1', '2', '--out',
                                str(out)])
  rows = json.loads(out.read_text())['rows']
  assert [(r['split'], r['devices']) for r in rows] == [
      ('query', 1), ('query', 2), ('data', 1), ('data', 2)]
  assert all(r['step_s'] > 0 for r in rows)


def test_bench_deepzero_quick(tmp_path):
  _load('bench_deepzero').main(['--quick', '--methods', 'reuse', '--out',
                                str(tmp_path)])
  report = json.loads((tmp_path / 'bench_deepzero_cpu_quick.json').read_text())
  (row,) = report['rows']
  assert row['method'] == 'reuse' and row['step_s'] > 0
  assert row['cosine_to_autodiff'] > 0.99  # feature reuse CGE is CGE


def test_bench_estimators_quick_profile(tmp_path):
  out = tmp_path / 'bench_estimators.json'
  _load('bench_estimators').main(['--quick', '--repeats', '1', '--profile',
                                  '3', '--out', str(out)])
  rows = json.loads(out.read_text())['rows']
  assert [r['estimator'] for r in rows] == [
      'RGE q=4 gaussian', 'RGE q=4 rademacher', 'CGE 64 coords']
  for row in rows:
    assert row['step_s'] > 0 and row['floor_s'] > 0
    step, floor = row['kernels']['step'], row['kernels']['floor']
    assert step and floor  # at least one traced line each
    assert all(0 < len(line['top']) <= 3 for line in step.values())


def test_committed_outputs_hold_no_absolute_machine_paths():
  root = pathlib.Path(__file__).resolve().parents[1]
  pattern = re.compile(r'(?<![\w.])/(?:root|home|work|tmp|Users)/')
  offenders = []
  for path in list((root / 'experiments' / 'results').glob('*.json')) + list(
      (root / 'experiments' / 'results').glob('*.log')) + list(
          (root / 'notebooks').glob('*.ipynb')):
    if pattern.search(path.read_text(errors='replace')):
      offenders.append(path.name)
  assert not offenders, offenders


def test_bench_generator_quick(tmp_path):
  module = _load('bench_generator')
  key = jax.random.key_data(jax.random.key(3))
  counters = jnp.arange(64, dtype=jnp.uint32)
  for got, want in zip(module.threefry2x32(key, counters, counters * 7, 20),
                       jax.extend.random.threefry2x32_p.bind(
                           key[0], key[1], counters, counters * 7)):
    np.testing.assert_array_equal(got, want)  # the 13-round variant's base
  rows = module.main([
      '--quick', '--repeats', '1', '--generators', 'floor', 'zojax',
      'threefry16_erfinv', '--out', str(tmp_path)])
  assert set(rows) == {'floor', 'zojax', 'threefry16_erfinv'}
  assert all(r['pass_s'] > 0 for r in rows.values())


def test_profile_step_quick(tmp_path):
  table = _load('profile_step').main(['--quick', '--method', 'inference',
                                      '--calls', '1', '--json',
                                      str(tmp_path / 'profile.json')])
  assert table and all(row['events_per_call'] > 0 for row in table.values())
  assert json.loads((tmp_path / 'profile.json').read_text())['lines']
