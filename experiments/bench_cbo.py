"""Particle-steps per second of ``zojax.cbo`` against CBXpy.

Both run CBO on the Rastrigin function (CBXpy's ``cbx.objectives.Rastrigin``
and the same formula in JAX) from the same initial particles, with the same
N, d, number of steps and hyperparameters (anisotropic noise, alpha = 100),
in four variants, each spelled in both libraries:

* ``plain``: constant alpha, all particles interact;
* ``mini-batch``: random mini-batches of N/4 particles, only the batch moves
  (``particle_batch=N // 4``; CBXpy's ``batch_args={'size': N // 4,
  'partial': True}``);
* ``ess``: alpha set after every step for an effective sample size of N/2
  (``target_ess=0.5``; CBXpy's ``effective_sample_size(eta=0.5)``
  scheduler, given 40 bisection steps: its default 15 resolve alpha only to
  ~1.5 on [1e-5, 1e5]);
* ``resampling``: every particle kicked by 0.1 sqrt(dt) xi after a step when
  the consensus moved less than 1e-4 in each of the last 5 steps
  (``resample_tol=1e-4``; CBXpy's ``consensus_stagnation(patience=5,
  update_thresh=1e-4)`` in ``resampling`` as its ``post_process``).

Speed: zojax runs all steps as one jitted ``lax.scan`` of ``tx.update`` (no
host work between steps), CBXpy its ``optimize()`` loop in its vectorized
mode (``f_dim='3D'``); each time is the minimum over ``--repeats`` runs
(zojax's after compilation), the two libraries' runs interleaved. The rate
counts the particles evaluated per step (N/4 for ``mini-batch``). Quality,
so that the
speeds compare like with like: the objective at the final consensus point,
median over ``--quality-runs`` independent runs at N = ``--quality-n`` (both
libraries run them at once: a ``vmap`` in zojax, CBXpy's M axis), and the
mean number of resamplings per run.

  python experiments/bench_cbo.py --out experiments/results/bench_cbo_cpu.json
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

import harness
import zojax

CONFIG = dict(alpha=100.0, drift=1.0, noise=0.8, dt=0.02,
              noise_kind='anisotropic')
VARIANTS = ('plain', 'mini-batch', 'ess', 'resampling')
ESS, RESAMPLE_TOL, PATIENCE, RESAMPLE_STD = 0.5, 1e-4, 5, 0.1


def rastrigin(x):
  """CBXpy's Rastrigin with b = 0, c = 0: 10 d + sum(x^2 - 10 cos(2 pi x))."""
  return 10.0 * x.shape[-1] + jnp.sum(x**2 - 10.0 * jnp.cos(2 * jnp.pi * x),
                                      axis=-1)


def initial_particles(num_particles, dim, seed=0):
  rng = np.random.default_rng(seed)
  return rng.uniform(-3.0, 3.0, size=(num_particles, dim))


def zojax_options(variant, num_particles):
  if variant == 'mini-batch':
    return {'particle_batch': num_particles // 4}
  if variant == 'ess':
    return {'target_ess': ESS}
  if variant == 'resampling':
    return {'resample_tol': RESAMPLE_TOL, 'resample_patience': PATIENCE,
            'resample_std': RESAMPLE_STD}
  return {}


def cbx_options(variant, num_particles):
  """CBXpy's spelling of a variant: constructor arguments, scheduler and the
  resampling object (or None)."""
  from cbx.scheduler import effective_sample_size
  from cbx.utils import resampling
  if variant == 'mini-batch':
    return {'batch_args': {'size': num_particles // 4, 'partial': True}}, (
        None, None)
  if variant == 'ess':
    return {}, (effective_sample_size(eta=ESS, solve_max_it=40), None)
  if variant == 'resampling':
    resample = resampling.resampling(
        [resampling.consensus_stagnation(patience=PATIENCE,
                                         update_thresh=RESAMPLE_TOL)],
        sigma_indep=RESAMPLE_STD)
    return {'post_process': resample}, (None, resample)
  return {}, (None, None)


def zojax_run(variant, num_particles, dim, steps):
  """``(init, run)``: ``init(x0, seed)`` is a state with the particles
  ``x0``, ``run(state)`` takes ``steps`` steps and returns f(final
  consensus) and the number of resamplings."""
  obj_fn = lambda p: rastrigin(p['x'])
  params = {'x': jnp.zeros(dim, jnp.float32)}

  def transform(seed):
    return zojax.cbo(num_particles, seed=seed, **CONFIG,
                     **zojax_options(variant, num_particles))

  def init(x0, seed):
    return transform(seed).init(params)._replace(particles={'x': x0})

  def run(state):
    tx = transform(0)  # the seed only matters to init: the key is the state's

    def step(carry, _):
      p, s = carry
      updates, s = tx.update(None, s, p, obj_fn=obj_fn)
      return (optax.apply_updates(p, updates), s), None

    (final, state), _ = jax.lax.scan(step, (params, state), None,
                                     length=steps)
    return obj_fn(final), state.resamplings

  return init, run


def zojax_timed(variant, x0, steps, seed=0):
  """A compiled run from ``x0``: ``() -> (seconds, f(final consensus))``."""
  init, run = zojax_run(variant, *x0.shape, steps)
  state = jax.jit(init)(jnp.asarray(x0, jnp.float32), seed)
  run = jax.jit(run)
  jax.block_until_ready(run(state))

  def timed():
    start = time.perf_counter()
    value, _ = jax.block_until_ready(run(state))
    return time.perf_counter() - start, float(value)

  return timed


def cbx_run(variant, x0, steps, seed=0):
  """CBXpy on initial particles ``x0`` of shape (M, N, d), M runs at once:
  seconds, f(final consensus) per run, resamplings per run."""
  from cbx.dynamics import CBO
  from cbx.objectives import Rastrigin
  f = Rastrigin()
  kwargs, (sched, resample) = cbx_options(variant, x0.shape[1])
  # f_dim='3D': f gets the whole (M, N, d) array (CBXpy's vectorized mode;
  # its default '1D' calls f once per particle).
  dyn = CBO(f, f_dim='3D', x=x0.copy(), dt=CONFIG['dt'],
            alpha=CONFIG['alpha'], sigma=CONFIG['noise'],
            lamda=CONFIG['drift'], noise=CONFIG['noise_kind'], max_it=steps,
            verbosity=0, seed=seed, **kwargs)
  start = time.perf_counter()
  dyn.optimize(sched=sched)
  seconds = time.perf_counter() - start
  values = f(np.asarray(dyn.consensus).reshape(x0.shape[0], 1, -1))[:, 0]
  counts = (np.zeros(x0.shape[0]) if resample is None or
            resample.num_resampling is None else resample.num_resampling)
  return seconds, values, counts


def quality(variant, dim, args):
  """Median f(final consensus) and mean resamplings over independent runs
  at N = ``args.quality_n``, for zojax and (unless ``--no-cbx``) CBXpy."""
  runs, n = args.quality_runs, args.quality_n
  x0 = np.stack([initial_particles(n, dim, seed=1000 + r)
                 for r in range(runs)])
  init, run = zojax_run(variant, n, dim, args.steps)
  values, counts = jax.jit(jax.vmap(lambda x, seed: run(init(x, seed))))(
      jnp.asarray(x0, jnp.float32), jnp.arange(runs))
  row = {'zojax_median_value': float(np.median(values)),
         'zojax_resamplings': float(np.mean(counts))}
  if not args.no_cbx:
    _, values, counts = cbx_run(variant, x0, args.steps, seed=1)
    row.update(cbx_median_value=float(np.median(values)),
               cbx_resamplings=float(np.mean(counts)))
  return row


def speed_row(variant, n, dim, args):
  evaluated = n // 4 if variant == 'mini-batch' else n
  x0 = initial_particles(n, dim)
  zojax_run_once = zojax_timed(variant, x0, args.steps)
  z_time = c_time = float('inf')
  for _ in range(args.repeats):  # interleaved: a busy phase hits both
    seconds, z_value = zojax_run_once()
    z_time = min(z_time, seconds)
    if not args.no_cbx:
      seconds, c_values, _ = cbx_run(variant, x0[None], args.steps)
      c_time = min(c_time, seconds)
  row = dict(variant=variant, particles=n, dim=dim, steps=args.steps,
             zojax_s=z_time, zojax_rate=evaluated * args.steps / z_time,
             zojax_value=z_value)
  if not args.no_cbx:
    row.update(cbx_s=c_time, cbx_rate=evaluated * args.steps / c_time,
               cbx_value=float(c_values[0]), speedup=c_time / z_time)
  return row


def print_tables(rows, quality_rows):
  nan = float('nan')
  print('\n| variant | N | d | zojax particle-steps/s | CBXpy particle-steps/s '
        '| speed-up | f(consensus) zojax | f(consensus) CBXpy |\n'
        '|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['variant']} | {r['particles']:,} | {r['dim']} | "
          f"{r['zojax_rate']:.3g} | {r.get('cbx_rate', nan):.3g} | "
          f"{r.get('speedup', nan):.1f}x | {r['zojax_value']:.3g} | "
          f"{r.get('cbx_value', nan):.3g} |")
  if not quality_rows:
    return
  print('\n| variant | N | d | runs | median f(consensus) zojax | CBXpy | '
        'resamplings per run zojax | CBXpy |\n'
        '|---|---|---|---|---|---|---|---|')
  for r in quality_rows:
    print(f"| {r['variant']} | {r['particles']:,} | {r['dim']} | {r['runs']} "
          f"| {r['zojax_median_value']:.3g} | "
          f"{r.get('cbx_median_value', nan):.3g} | "
          f"{r['zojax_resamplings']:.1f} | "
          f"{r.get('cbx_resamplings', nan):.1f} |")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--particles', type=int, nargs='+',
                      default=[1000, 10000, 100000])
  parser.add_argument('--dims', type=int, nargs='+', default=[10, 100])
  parser.add_argument('--variants', nargs='+', default=list(VARIANTS),
                      choices=VARIANTS)
  parser.add_argument('--steps', type=int, default=100)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--quality-runs', type=int, default=20)
  parser.add_argument('--quality-n', type=int, default=1000)
  parser.add_argument('--no-cbx', action='store_true')
  parser.add_argument('--out', default='results/bench_cbo.json')
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  print(f'{device.platform} ({device.device_kind}), jax {jax.__version__}, '
        f'{args.steps} steps, {CONFIG}')
  rows, quality_rows = [], []
  for variant in args.variants:
    for dim in args.dims:
      for n in args.particles:
        rows.append(speed_row(variant, n, dim, args))
        print(rows[-1], flush=True)
      if args.quality_runs:
        quality_rows.append(dict(variant=variant, particles=args.quality_n,
                                 dim=dim, runs=args.quality_runs,
                                 **quality(variant, dim, args)))
        print(quality_rows[-1], flush=True)
  print_tables(rows, quality_rows)
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'device': device.device_kind, 'platform': device.platform,
               'jax': jax.__version__, 'host': platform.node(),
               'config': CONFIG, 'args': harness.config(args), 'rows': rows,
               'quality': quality_rows}, f, indent=1)
  print(f'wrote {harness.shown(args.out)}')


if __name__ == '__main__':
  main()
