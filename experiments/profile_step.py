"""Where the time of a benchmarked step goes: a ``jax.profiler`` trace of a
few calls, the device's kernels summed by name.

Profiles a method of ``bench_mezo.py`` (``--method``, same model flags) and
prints, per device line of the trace (XLA's ops, the CUDA streams; on a
CPU the host's threads), the kernels with the largest total time per call, with their share of the
line's total and its number of launches, and how much of the time the
line spans it is busy; ``--json`` writes the table. (The fusions' HLO:
``XLA_FLAGS=--xla_dump_to=DIR``.)

  python experiments/profile_step.py --method mezo
  python experiments/profile_step.py --method mezo_noise --top 15
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable

import jax

import bench_mezo


def kernel_table(trace_dir: str, calls: int, top: int,
                 plane_prefix: str = '/device:') -> dict:
  """Per line of the planes named ``plane_prefix*`` (the accelerators';
  ``'/host:CPU'`` on a CPU): its busy and spanned time per call, its event
  count and its ``top`` events by total time ``(name, ms per call, share,
  count per call)``."""
  files = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'),
                    recursive=True)
  data = jax.profiler.ProfileData.from_file(files[0])
  table = {}
  for plane in data.planes:
    if not plane.name.startswith(plane_prefix):
      continue
    for line in plane.lines:
      totals, counts = collections.Counter(), collections.Counter()
      first, last = float('inf'), 0.0
      for event in line.events:
        totals[event.name] += event.duration_ns
        counts[event.name] += 1
        first = min(first, event.start_ns)
        last = max(last, event.end_ns)
      whole = sum(totals.values())
      if not whole:  # markers only
        continue
      table[f'{plane.name} {line.name}'] = {
          'total_ms_per_call': whole / calls / 1e6,
          'span_ms_per_call': (last - first) / calls / 1e6,
          'events_per_call': sum(counts.values()) / calls,
          'top': [(name, ns / calls / 1e6, ns / whole, counts[name] / calls)
                  for name, ns in totals.most_common(top)]}
  return table


def traced_kernels(call: Callable[[], Any], calls: int, top: int) -> dict:
  """:func:`kernel_table` of a ``jax.profiler`` trace of ``calls`` calls of
  ``call`` (the accelerators' lines; on a CPU, the host's threads)."""
  trace_dir = tempfile.mkdtemp()
  jax.profiler.start_trace(trace_dir)
  for _ in range(calls):
    jax.block_until_ready(call())
  jax.profiler.stop_trace()
  table = kernel_table(trace_dir, calls, top,
                       '/host:CPU' if jax.default_backend() == 'cpu' else
                       '/device:')
  shutil.rmtree(trace_dir)
  return table


def print_kernels(table: dict, indent: str = '') -> None:
  """Prints a :func:`kernel_table`: per line, busy and spanned time per
  call, then its kernels (ms per call, share, launches per call, name)."""
  for line, row in table.items():
    print(f'{indent}{line}: {row["total_ms_per_call"]:.3f} ms busy of '
          f'{row["span_ms_per_call"]:.3f} ms spanned per call, '
          f'{row["events_per_call"]:.0f} events')
    for name, ms, share, count in row['top']:
      print(f'{indent}  {ms:9.3f} ms  {100 * share:5.1f}%  x{count:<5.0f} '
            f'{name[:100]}')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--method', default='mezo',
                      choices=bench_mezo.METHODS)
  parser.add_argument('--calls', type=int, default=3)
  parser.add_argument('--top', type=int, default=20)
  parser.add_argument('--json', default=None)
  bench_mezo.add_model_arguments(parser)
  parser.add_argument('--quick', action='store_true')
  args = parser.parse_args(argv)
  if args.quick:
    bench_mezo.quick_model(args)
  call, params, state = bench_mezo.runner(bench_mezo.decoder(args),
                                          args.method, args)
  params, state, value = call(params, state)  # compiles
  jax.block_until_ready(value)
  carry = [params, state]

  def one_call():
    carry[0], carry[1], value = call(*carry)
    return value

  start = time.perf_counter()
  table = traced_kernels(one_call, args.calls, args.top)
  print(f'{args.method}: {(time.perf_counter() - start) / args.calls * 1e3:.1f}'
        ' ms per call while tracing')
  print_kernels(table)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'method': args.method, 'device': jax.devices()[0].device_kind,
                 'jax': jax.__version__, 'lines': table}, f, indent=1)
  return table


if __name__ == '__main__':
  main()
