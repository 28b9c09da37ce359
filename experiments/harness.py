"""What the experiment and benchmark scripts share: their common command-line
arguments and interleaved timing."""

from __future__ import annotations

import argparse
import os
import time

import jax


def run_arguments(description: str) -> argparse.ArgumentParser:
  """A parser with ``--quick`` (default: ``ZOJAX_QUICK=1``) and ``--out``."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument('--quick', action='store_true',
                      default=os.environ.get('ZOJAX_QUICK', '') == '1',
                      help='a small smoke run (as in CI)')
  parser.add_argument('--out', default='results',
                      help='folder for the JSON and PNG outputs')
  return parser


REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shown(path: str) -> str:
  """``path`` as printed and stored in outputs: relative to the repository
  (no absolute machine paths in committed logs and notebooks)."""
  absolute = os.path.abspath(path)
  if absolute.startswith(REPOSITORY + os.sep):
    return os.path.relpath(absolute, REPOSITORY)
  return os.path.basename(absolute)


def config(args) -> dict:
  """The command-line arguments for a JSON output, ``out`` relative."""
  values = dict(vars(args))
  if isinstance(values.get('out'), str):
    values['out'] = shown(values['out'])
  return values


def time_interleaved(calls: dict, repeats: int) -> dict:
  """Minimum wall time of each ``fn(*args)`` in ``calls`` (name -> (fn,
  args)), after one warm-up call each; the calls run round-robin, so that a
  slow phase of a shared machine hits all of them alike."""
  for fn, args in calls.values():
    jax.block_until_ready(fn(*args))
  best = {name: float('inf') for name in calls}
  for _ in range(repeats):
    for name, (fn, args) in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      best[name] = min(best[name], time.perf_counter() - start)
  return best
