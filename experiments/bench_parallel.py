"""Steps per second of sharded RGE and CGE on 1 device vs N devices.

A ResNet-20 (269,722 parameters, ``zojax.models.ResNet20``) on a CIFAR-shaped
batch of random images; one jitted estimator step of

* RGE with ``--queries`` (64) directions, split over the devices
  (perturbation parallelism, ``query_axis``),
* CGE with ``--coords`` (4096) sampled coordinates, split the same way,
* and each of them with the batch split instead (``data_axis``),

for each device count in ``--devices`` (default: 1 and every device). Each
time is the minimum over ``--repeats`` runs, with the device counts
interleaved round-robin. The speed-up is against the 1-device run of the same
configuration. Per step only the summed estimate (one ``psum`` of d float32
over the query axis) and scalars per query cross devices; the table's
``comm`` column gives those bytes per device and step.

  python experiments/bench_parallel.py               # all devices, JSON
  python experiments/bench_parallel.py --quick       # small smoke run (CPU)

On a CPU, simulate devices with
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (they share the
CPU's cores, so this checks the code path, not the speed-up).
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import jax
import jax.numpy as jnp

import zojax
import harness
from harness import time_interleaved
from zojax import models


def problem(batch: int, blocks_per_stage: int):
  """ResNet params, a random CIFAR-shaped batch and ``loss(params, batch)``."""
  model = models.ResNet20(blocks_per_stage=blocks_per_stage)
  key_x, key_y, key_p = jax.random.split(jax.random.PRNGKey(0), 3)
  images = jax.random.normal(key_x, (batch, 32, 32, 3), jnp.float32)
  labels = jax.random.randint(key_y, (batch,), 0, 10)
  params = model.init(key_p, images[:2])['params']

  def loss(p, data):
    x, y = data
    return models.cross_entropy(model.apply({'params': p}, x), y)

  return params, (images, labels), loss


def make_estimator(method: str, args, mesh, axis_role: str):
  axes = {} if mesh is None else {
      'mesh': mesh, 'query_axis': 'q' if axis_role == 'query' else None,
      'data_axis': 'q' if axis_role == 'data' else None}
  if method == 'rge':
    return zojax.rge(args.queries, 1e-3, distribution=args.distribution,
                     batch_size=args.chunk, **axes)
  return zojax.cge(1e-3, num_coords=args.coords, batch_size=args.chunk,
                   **axes)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--devices', type=int, nargs='+', default=None,
                      help='device counts to compare (default: 1 and all)')
  parser.add_argument('--queries', type=int, default=64)
  parser.add_argument('--coords', type=int, default=4096)
  parser.add_argument('--batch', type=int, default=128,
                      help='images per step (CIFAR-shaped, random)')
  parser.add_argument('--chunk', type=int, default=8,
                      help='queries vmapped at once on each device')
  parser.add_argument('--distribution', default='rademacher')
  parser.add_argument('--methods', nargs='+', default=['rge', 'cge'])
  parser.add_argument('--roles', nargs='+', default=['query', 'data'],
                      help='split the queries, or the batch, over devices')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--quick', action='store_true',
                      help='tiny configuration for a smoke run')
  parser.add_argument('--out', default='results/bench_parallel.json')
  args = parser.parse_args(argv)
  blocks = 3
  if args.quick:
    args.queries, args.coords, args.batch, args.chunk = 8, 8, 8, 2
    blocks = 1
  available = jax.device_count()
  counts = args.devices or sorted({1, available})
  if max(counts) > available:
    raise SystemExit(f'asked for {max(counts)} devices, {available} exist')

  params, batch, loss = problem(args.batch, blocks)
  num_params = models.num_params(params)
  device = jax.devices()[0]
  print(f'{device.platform} ({device.device_kind}) x {available}, '
        f'jax {jax.__version__}; ResNet (blocks/stage {blocks}) '
        f'{num_params:,} params, batch {args.batch}, chunk {args.chunk}')

  rows = []
  for method in args.methods:
    queries = args.queries if method == 'rge' else args.coords
    for role in args.roles:
      calls = {}
      for n in counts:
        mesh = jax.make_mesh((n,), ('q',), devices=jax.devices()[:n])
        tx = make_estimator(method, args, mesh, role)
        state = tx.init(params)
        placed = batch
        if role == 'data':
          placed = zojax.parallel.shard_batch(batch, mesh, 'q')

        @jax.jit
        def step(p, s, b, tx=tx):
          updates, s = tx.update(None, s, p, obj_fn=loss, batch=b)
          return jax.tree.map(lambda x, u: x - 1e-3 * u, p, updates), s

        calls[n] = (step, (params, state, placed))
      times = time_interleaved(calls, args.repeats)
      for n in counts:
        # One psum of the estimate (d float32) over the query axis, or one
        # pmean of a chunk's values per chunk over the data axis.
        comm = 4 * num_params if role == 'query' and n > 1 else 0
        if role == 'data' and n > 1:
          comm = 4 * (queries + 1)
        rows.append(dict(
            method=method, queries=queries, split=role, devices=n,
            step_s=times[n], steps_per_s=1.0 / times[n],
            speedup=times[counts[0]] / times[n], comm_bytes=comm))

  print('\n| method | queries | split | devices | step (ms) | steps/s | '
        'speed-up | comm (bytes/step) |\n|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['method'].upper()} | {r['queries']} | {r['split']} | "
          f"{r['devices']} | {1e3 * r['step_s']:.1f} | "
          f"{r['steps_per_s']:.2f} | {r['speedup']:.2f}x | "
          f"{r['comm_bytes']:,} |")
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'device': device.device_kind, 'platform': device.platform,
               'device_count': available, 'jax': jax.__version__,
               'host': platform.node(), 'params': num_params,
               'config': harness.config(args), 'rows': rows}, f, indent=1)
  print(f'wrote {harness.shown(args.out)}')


if __name__ == '__main__':
  main()
