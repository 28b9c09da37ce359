"""Particle-steps per second of ``zojax.cbo`` against CBXpy.

Both run CBO on the Rastrigin function (CBXpy's ``cbx.objectives.Rastrigin``
and the same formula in JAX) from the same initial particles, with the same
N, d, number of steps and hyperparameters (anisotropic noise, constant
alpha), and report the objective at their final consensus point so that the
speeds compare like with like. zojax runs all steps as one jitted
``lax.scan`` of ``tx.update`` (no host work between steps); its time is the
minimum over ``--repeats`` runs after compilation. CBXpy runs its
``optimize()`` loop with no scheduler (one run; it has no compilation).

  python experiments/bench_cbo.py                   # CPU table + JSON
  python experiments/bench_cbo.py --no-cbx --particles 1000 10000 100000 1000000

``--no-cbx`` times zojax alone (e.g. on a GPU machine without CBXpy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import zojax

CONFIG = dict(alpha=100.0, drift=1.0, noise=0.8, dt=0.02,
              noise_kind='anisotropic')


def rastrigin(x):
  """CBXpy's Rastrigin with b = 0, c = 0: 10 d + sum(x^2 - 10 cos(2 pi x))."""
  return 10.0 * x.shape[-1] + jnp.sum(x**2 - 10.0 * jnp.cos(2 * jnp.pi * x),
                                      axis=-1)


def initial_particles(num_particles, dim, seed=0):
  rng = np.random.default_rng(seed)
  return rng.uniform(-3.0, 3.0, size=(num_particles, dim))


def run_zojax(x0, steps, repeats, seed=0):
  num_particles, dim = x0.shape
  tx = zojax.cbo(num_particles, seed=seed, **CONFIG)
  params = {'x': jnp.zeros(dim, jnp.float32)}
  state = tx.init(params)
  state = state._replace(particles={'x': jnp.asarray(x0, jnp.float32)})
  obj_fn = lambda p: rastrigin(p['x'])

  @jax.jit
  def run(params, state):
    def step(carry, _):
      p, s = carry
      updates, s = tx.update(None, s, p, obj_fn=obj_fn)
      return (optax.apply_updates(p, updates), s), None
    return jax.lax.scan(step, (params, state), None, length=steps)[0]

  jax.block_until_ready(run(params, state))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    final, _ = jax.block_until_ready(run(params, state))
    best = min(best, time.perf_counter() - start)
  return best, float(obj_fn(final))


def run_cbx(x0, steps, seed=0):
  from cbx.dynamics import CBO
  from cbx.objectives import Rastrigin
  f = Rastrigin()
  # f_dim='3D': f gets the whole (M, N, d) array (CBXpy's vectorized mode;
  # its default '1D' calls f once per particle).
  dyn = CBO(f, f_dim='3D', x=x0[None].copy(), dt=CONFIG['dt'],
            alpha=CONFIG['alpha'],
            sigma=CONFIG['noise'], lamda=CONFIG['drift'],
            noise=CONFIG['noise_kind'], max_it=steps, verbosity=0, seed=seed)
  start = time.perf_counter()
  dyn.optimize(sched=None)
  seconds = time.perf_counter() - start
  return seconds, float(f(np.asarray(dyn.consensus).reshape(1, -1))[0])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--particles', type=int, nargs='+',
                      default=[1000, 10000, 100000])
  parser.add_argument('--dims', type=int, nargs='+', default=[10, 100])
  parser.add_argument('--steps', type=int, default=100)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--no-cbx', action='store_true')
  parser.add_argument('--out', default='results/bench_cbo.json')
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  print(f'{device.platform} ({device.device_kind}), jax {jax.__version__}, '
        f'{args.steps} steps, {CONFIG}')
  rows = []
  for dim in args.dims:
    for n in args.particles:
      x0 = initial_particles(n, dim)
      z_time, z_value = run_zojax(x0, args.steps, args.repeats)
      row = dict(particles=n, dim=dim, steps=args.steps, zojax_s=z_time,
                 zojax_rate=n * args.steps / z_time, zojax_value=z_value)
      if not args.no_cbx:
        c_time, c_value = run_cbx(x0, args.steps)
        row.update(cbx_s=c_time, cbx_rate=n * args.steps / c_time,
                   cbx_value=c_value, speedup=c_time / z_time)
      rows.append(row)
      print(row, flush=True)

  print('\n| N | d | zojax particle-steps/s | CBXpy particle-steps/s | '
        'speed-up | f(consensus) zojax | f(consensus) CBXpy |\n'
        '|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['particles']:,} | {r['dim']} | {r['zojax_rate']:.3g} | "
          f"{r.get('cbx_rate', float('nan')):.3g} | "
          f"{r.get('speedup', float('nan')):.1f}x | {r['zojax_value']:.3g} | "
          f"{r.get('cbx_value', float('nan')):.3g} |")
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'device': device.device_kind, 'platform': device.platform,
               'jax': jax.__version__, 'host': platform.node(),
               'config': CONFIG, 'args': vars(args), 'rows': rows}, f,
              indent=1)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
