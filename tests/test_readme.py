"""The README's Python examples run as written, in order, in one namespace
(on 8 simulated CPU devices, so the mesh examples run too). The multi-host
example needs several processes; tests/test_multiprocess.py runs it."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def python_blocks():
  text = README.read_text()
  return re.findall(r'```python\n(.*?)```', text, flags=re.S)


def test_readme_examples_run_as_written():
  namespace = {}
  blocks = python_blocks()
  assert len(blocks) >= 6
  ran = 0
  for block in blocks:
    if 'jax.distributed.initialize' in block:
      continue
    exec(compile(block, str(README), 'exec'), namespace)  # pylint: disable=exec-used
    ran += 1
  assert ran >= 5
  info = namespace['zojax'].estimate_info(namespace['state'])
  assert info.num_evals > 0


if __name__ == '__main__':
  pytest.main([__file__])
