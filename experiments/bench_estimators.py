"""Step time of RGE and CGE against the bare forward passes they need.

For an MLP of ~1.07M parameters (784-1024-256-10) and a batch of 256, times
one jitted estimator step and compares it with the *physical floor*: the same
number of forward passes and nothing else. Two floors are measured and the
smaller is used:

* ``vmap``: forwards vmapped (in chunks of each tried ``batch_size``) over
  parameter copies that already exist in memory;
* ``scan``: forwards run one after the other at params shifted by a scalar
  (one copy in cache; the cheapest way to run many forwards on a CPU).

A ratio of 1.0 means the estimator adds nothing to the forwards. For
reference (not used in the ratio) the table also gives ``copies``: the same
vmapped forwards at params shifted by a scalar, i.e. including the write of the
perturbed parameter copies that any estimator with per-query weights must
make. Every time is the minimum over ``--repeats`` runs of the compiled
function; the runs of an estimator's steps and of its floors are interleaved
(round-robin), so that a slow phase of a shared machine hits all of them alike.

  python experiments/bench_estimators.py                 # CPU/GPU table + JSON
  python experiments/bench_estimators.py --prng rbg      # faster random bits
  python experiments/bench_estimators.py --quick         # small smoke run
  python experiments/bench_estimators.py --cge-coords 0 --queries 32 \
      --batch-sizes 32 --profile 25   # + where the step's and floor's time go

Also prints the cost of direction generation per number, since on a CPU
generating N(0, 1) numbers costs more than the forward pass itself.
``--profile TOP`` then traces each row's fastest step and its floor
(``jax.profiler``, ``PROFILE_CALLS`` calls each) and prints and stores
(``kernels`` in the JSON) the TOP kernels of each by time per call: one
call of the step is the whole step, one call of a ``vmap`` floor one chunk
(``floor_calls_per_step`` of them make the floor).
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
import profile_step
from harness import time_interleaved
from zojax import models
from zojax._src.query import directions


PROFILE_CALLS = 20


def _time(fn, *args, repeats: int) -> float:
  """Minimum wall time of ``fn(*args)`` (compiled, after one warm-up call)."""
  return time_interleaved({'fn': (fn, args)}, repeats)['fn']


def _problem(features, batch, in_dim):
  model = models.MLP(features)
  key_x, key_y, key_p = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(key_x, (batch, in_dim), jnp.float32)
  y = jax.random.randint(key_y, (batch,), 0, features[-1])
  params = model.init(key_p, x[:1])['params']
  obj_fn = lambda p: models.cross_entropy(model.apply({'params': p}, x), y)
  return params, obj_fn


def vmap_floor(params, obj_fn, num_evals, chunk):
  """``num_evals`` forwards, vmapped in chunks over stored copies.

  Returns ``(fn, args, scale)``: time ``fn(*args)`` and multiply by ``scale``.
  """
  chunk = min(chunk, num_evals)
  stacked = jax.tree.map(
      lambda x: x[None] + 1e-3 * jnp.arange(chunk, dtype=x.dtype).reshape(
          (chunk,) + (1,) * x.ndim), params)
  forwards = jax.jit(lambda s: jnp.sum(jax.vmap(obj_fn)(s)))
  return forwards, (stacked,), num_evals / chunk


def copies_reference(params, obj_fn, num_evals, chunk):
  """``num_evals`` vmapped forwards at scalar-shifted params (copies written)."""
  chunk = min(chunk, num_evals)
  shifts = 1e-6 * jnp.arange(chunk, dtype=jnp.float32)
  forwards = jax.jit(lambda p: jax.vmap(
      lambda s: obj_fn(jax.tree.map(lambda x: x + s, p)))(shifts).sum())
  return forwards, (params,), num_evals / chunk


def scan_floor(params, obj_fn, num_evals, max_scan=129):
  """``num_evals`` sequential forwards at scalar-shifted params."""
  length = min(num_evals, max_scan)
  shifts = 1e-6 * jnp.arange(length, dtype=jnp.float32)
  forwards = jax.jit(lambda p: jax.lax.map(
      lambda s: obj_fn(jax.tree.map(lambda x: x + s, p)), shifts).sum())
  return forwards, (params,), num_evals / length


def estimator_step(tx, params, obj_fn):
  state = tx.init(params)
  step = jax.jit(lambda s, p: tx.update(None, s, p, obj_fn=obj_fn)[0])
  return step, (state, params), 1.0


def generation_ns_per_number(distribution, size=1 << 22, repeats=5):
  key = jax.random.PRNGKey(0)
  if distribution == 'gaussian':
    gen = jax.jit(lambda k: jnp.sum(jax.random.normal(k, (size,))))
  else:
    gen = jax.jit(lambda k: jnp.sum(directions.leaf_draw(
        jax.random.key_data(k), (size,), 'rademacher')))
  return _time(gen, key, repeats=repeats) / size * 1e9


def kernels_of(call, top: int) -> dict:
  """The ``top`` kernels of ``PROFILE_CALLS`` calls of ``call = (fn, args)``
  (:func:`profile_step.traced_kernels`)."""
  fn, args = call
  return profile_step.traced_kernels(lambda: fn(*args), PROFILE_CALLS, top)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true',
                      help='tiny model and few queries (smoke test)')
  parser.add_argument('--out', default='results/bench_estimators.json')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--cge-coords', type=int, default=4096,
                      help='sampled CGE coordinates (0 skips CGE)')
  parser.add_argument('--queries', type=int, nargs='+', default=[8, 32, 128])
  parser.add_argument('--batch-sizes', type=int, nargs='+',
                      default=[1, 8, 32],
                      help='vmap chunk sizes tried for each estimator')
  parser.add_argument('--prng', default=None,
                      choices=['threefry2x32', 'rbg', 'unsafe_rbg'],
                      help='jax_default_prng_impl for the estimators\' keys')
  parser.add_argument('--profile', type=int, default=0, metavar='TOP',
                      help='trace each row\'s fastest step and its floor and '
                      'print their TOP kernels')
  args = parser.parse_args(argv)
  if args.prng:
    jax.config.update('jax_default_prng_impl', args.prng)

  if args.quick:
    features, in_dim, batch = (64, 10), 32, 16
    queries, coords, chunks = [4], 64, [4]
  else:
    features, in_dim, batch = (1024, 256, 10), 784, 256
    queries, coords, chunks = args.queries, args.cge_coords, args.batch_sizes
  params, obj_fn = _problem(features, batch, in_dim)
  d = models.num_params(params)
  device = jax.devices()[0]
  prng = jax.config.jax_default_prng_impl
  print(f'MLP {in_dim}-{"-".join(map(str, features))}: {d:,} params, batch '
        f'{batch}; device {device.device_kind} ({jax.default_backend()}), '
        f'jax {jax.__version__}, prng {prng}')

  gen = {name: generation_ns_per_number(name, 1 << (14 if args.quick else 22))
         for name in ('gaussian', 'rademacher')}
  print('direction generation: ' + ', '.join(
      f'{k} {v:.2f} ns/number' for k, v in gen.items()))

  rows = []
  configs = [(f'RGE q={q} {dist}', q + 1,
              lambda b, q=q, dist=dist: zojax.rge(q, 1e-3, distribution=dist,
                                                  batch_size=b))
             for q in queries for dist in ('gaussian', 'rademacher')]
  if coords:
    configs.append((f'CGE {coords} coords', coords + 1,
                    lambda b: zojax.cge(1e-3, num_coords=coords,
                                        batch_size=b)))
  for name, evals, make in configs:
    calls = {'floor scan': scan_floor(params, obj_fn, evals)}
    for chunk in sorted({min(c, evals - 1) for c in chunks}):
      calls[f'step {chunk}'] = estimator_step(make(chunk), params, obj_fn)
      calls[f'floor vmap{chunk}'] = vmap_floor(params, obj_fn, evals, chunk)
      calls[f'copies {chunk}'] = copies_reference(params, obj_fn, evals, chunk)
    times = time_interleaved({k: v[:2] for k, v in calls.items()},
                              args.repeats)
    times = {k: t * calls[k][2] for k, t in times.items()}
    steps = {int(k.split()[1]): t for k, t in times.items()
             if k.startswith('step')}
    floors = {k.split()[1]: t for k, t in times.items()
              if k.startswith('floor')}
    best_chunk = min(steps, key=steps.get)
    floor_kind = min(floors, key=floors.get)
    copies = min(t for k, t in times.items() if k.startswith('copies'))
    row = dict(estimator=name, evals=evals, batch_size=best_chunk,
               step_s=steps[best_chunk], floor_s=floors[floor_kind],
               floor_kind=floor_kind, floors_s=floors,
               steps_s={str(k): v for k, v in steps.items()},
               ratio=steps[best_chunk] / floors[floor_kind],
               copies_s=copies, ratio_to_copies=steps[best_chunk] / copies,
               ns_per_param_per_eval=floors[floor_kind] / evals / d * 1e9)
    print(f'  {name:<24} ' + '  '.join(
        f'{k} {t*1e3:.1f}' for k, t in sorted(times.items())) +
          f' ms -> {row["ratio"]:.2f}', flush=True)
    if args.profile:
      floor_call = f'floor {floor_kind}'
      row['kernels'] = {
          'step': kernels_of(calls[f'step {best_chunk}'][:2], args.profile),
          'floor': kernels_of(calls[floor_call][:2], args.profile),
          'floor_calls_per_step': calls[floor_call][2]}
      for part in ('step', 'floor'):
        print(f'    {part} ({name}):')
        profile_step.print_kernels(row['kernels'][part], indent='      ')
    rows.append(row)

  print('\n| estimator | evals | batch_size | step (ms) | floor (ms) | '
        'floor kind | step / floor | copies (ms) | step / copies |\n'
        '|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['estimator']} | {r['evals']} | {r['batch_size']} | "
          f"{r['step_s']*1e3:.2f} | {r['floor_s']*1e3:.2f} | "
          f"{r['floor_kind']} | {r['ratio']:.2f} | {r['copies_s']*1e3:.2f} | "
          f"{r['ratio_to_copies']:.2f} |")
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(dict(params=d, batch=batch, device=device.device_kind, prng=prng,
                   backend=jax.default_backend(), jax=jax.__version__,
                   machine=platform.machine(), generation_ns=gen, rows=rows),
              f, indent=1)
  print(f'wrote {harness.shown(args.out)}')


if __name__ == '__main__':
  main()
