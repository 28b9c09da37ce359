"""ZO fine-tuning beyond one GPU's memory and across GPUs: ZO2-style
offloading and DistZO2-style parallelism of ``zojax.mezo``.

Parts (``--parts``), each method in a fresh process (its own peak memory):

* ``offload``: tokens/s of on-device ``zojax.mezo`` and of
  ``zojax.offload.OffloadedMeZO`` (layers in pinned host memory, streamed
  one at a time) on a decoder that fits both ways (``--fit-*``); then the
  offloaded step on a decoder ``--big-*`` whose bf16 params exceed the device
  memory cap ``--cap-gib`` (set with ``XLA_PYTHON_CLIENT_MEM_FRACTION``,
  the fraction of GPU 0's memory that ``nvidia-smi`` reports, or
  ``ZOJAX_CAP_FRACTION`` if set).
* ``distributed``: tokens/s of ``zojax.mezo`` on 1 device and on 2 with the
  queries split (q = 1: one sign per device; q = 2: one query per device),
  the batch split, and a decoder sharded over 2 devices (FSDP: stacked
  layers split along their output features) that does not fit on one.

  python experiments/bench_llm_scale.py --parts offload distributed
  python experiments/bench_llm_scale.py --parts offload_big  # capped run only
  python experiments/bench_llm_scale.py --quick       # CPU smoke run
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import harness

GiB = 2.0 ** 30


def decoder_config(args, prefix: str) -> dict:
  get = lambda name: getattr(args, f'{prefix}_{name}')
  return dict(vocab_size=args.vocab, num_layers=get('layers'),
              d_model=get('width'), num_heads=get('width') // 128,
              max_len=args.seq)


def cap_fraction(cap_gib: float) -> str:
  """``XLA_PYTHON_CLIENT_MEM_FRACTION`` that caps GPU 0 at ``cap_gib``.

  Read from ``nvidia-smi`` (this process does not start a JAX backend); on a
  machine without it (CPU runs, where the cap has no effect) ``'0.75'``.
  """
  try:
    out = subprocess.run(
        ['nvidia-smi', '--query-gpu=memory.total',
         '--format=csv,noheader,nounits'], capture_output=True, text=True,
        check=True).stdout
    total_gib = float(out.split()[0]) / 1024  # MiB
  except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
    return '0.75'
  return f'{cap_gib / total_gib:.4f}'


def run_worker(args, task: str, extra_env=None, timeout=None) -> dict:
  """``task`` in a fresh Python process; its RESULT line as a dict."""
  env = dict(os.environ, **(extra_env or {}))
  command = [sys.executable, os.path.abspath(__file__), '--worker', task,
             '--config', json.dumps(vars(args))]
  start = time.perf_counter()
  try:
    out = subprocess.run(command, capture_output=True, text=True, env=env,
                         timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return {'task': task, 'error': f'timeout after {timeout} s'}
  lines = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
  if not lines:
    return {'task': task, 'error': out.stderr[-1500:]}
  result = json.loads(lines[-1][len('RESULT '):])
  result['wall_s'] = time.perf_counter() - start
  return result


def main(argv=None):
  parser = harness.run_arguments(__doc__.splitlines()[0])
  parser.add_argument('--parts', nargs='+', default=['offload',
                                                     'distributed'])
  parser.add_argument('--vocab', type=int, default=32000)
  parser.add_argument('--seq', type=int, default=2048)
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--fit-layers', type=int, default=32)
  parser.add_argument('--fit-width', type=int, default=4096)
  parser.add_argument('--big-layers', type=int, default=52)
  parser.add_argument('--big-width', type=int, default=6144)
  parser.add_argument('--cap-gib', type=float, default=16.0)
  parser.add_argument('--dist-layers', type=int, default=20)
  parser.add_argument('--dist-width', type=int, default=2048)
  parser.add_argument('--dist-batch', type=int, default=4)
  parser.add_argument('--dist-seq', type=int, default=512)
  parser.add_argument('--sharded-layers', type=int, default=100)
  parser.add_argument('--sharded-width', type=int, default=8192)
  parser.add_argument('--timeout', type=float, default=420.0)
  parser.add_argument('--worker', help='(internal)')
  parser.add_argument('--config', help='(internal)')
  args = parser.parse_args(argv)
  if args.worker:
    import llm_scale_tasks  # pylint: disable=g-import-not-at-top
    return llm_scale_tasks.run(args.worker, json.loads(args.config))
  if args.quick:
    args.vocab, args.seq, args.batch, args.repeats = 256, 32, 2, 1
    args.fit_layers, args.fit_width = 2, 128
    args.big_layers, args.big_width, args.cap_gib = 3, 128, 1.0
    args.dist_layers, args.dist_width, args.dist_batch = 2, 128, 4
    args.dist_seq, args.sharded_layers, args.sharded_width = 32, 2, 128

  tasks = []
  if 'offload' in args.parts:
    tasks += [('on_device', None), ('offloaded', None),
              ('offloaded_big', {'XLA_PYTHON_CLIENT_MEM_FRACTION': None})]
  if 'offload_big' in args.parts:  # the capped run alone
    tasks += [('offloaded_big', {})]
  if 'distributed' in args.parts:
    tasks += [('dist_1', None), ('dist_signs_2', None),
              ('dist_queries_2', None), ('dist_queries_1', None),
              ('dist_data_2', None), ('sharded_2', None)]
  rows = []
  for task, env in tasks:
    if env is not None:  # the capped run: a fraction of this device
      env = {'XLA_PYTHON_CLIENT_MEM_FRACTION': os.environ.get(
          'ZOJAX_CAP_FRACTION', cap_fraction(args.cap_gib)),
             # pinned host memory for the layers (XLA's default cap: 64 GB)
             'XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB': os.environ.get(
                 'XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB', '100')}
    row = run_worker(args, task, env, timeout=args.timeout)
    rows.append(row)
    print(json.dumps(row), flush=True)

  os.makedirs(args.out, exist_ok=True)
  name = (f'bench_llm_scale_{"_".join(args.parts)}'
          f'{"_quick" if args.quick else ""}.json')
  with open(os.path.join(args.out, name), 'w') as f:
    json.dump({'config': harness.config(args), 'machine': platform.machine(),
               'rows': rows}, f, indent=1)
  print('wrote', harness.shown(os.path.join(args.out, name)))
  return rows


if __name__ == '__main__':
  main()
