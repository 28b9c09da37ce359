"""CBO reproductions: Riedl et al.'s figures and CBXpy-style success rates.

1. ``grand_canyon``: the numerical illustrations of "Gradient is All You
   Need?" (Riedl, Klock, Geldhauser & Fornasier, 2023) on the authors' 2-d
   "GrandCanyon3noisy" landscape (from
   ``BenchmarkFunctions/objective_function.m`` of
   KonstantinRiedl/CBOGlobalConvergenceAnalysis; global minimiser 0), with
   the parameters of their ``CBOstochasticGD/analyses`` scripts:

   * Fig. 1(b): where the consensus point of CBO (``zojax.cbo``: N = 200,
     250 steps, dt = 0.01, lambda = 1, sigma = 1.6, alpha = 100, isotropic
     noise, particles started at N((8, 8), 0.5^2)) sits over the iterations,
     50 runs;
   * Fig. 2(b, c): gradient descent and annealed Langevin dynamics
     (sigma_k = 10 / log(k + 1)) from (8, 8), 10^4 steps of dt = 10^-3,
     gradients from ``jax.grad``, 50 runs;
   * Fig. 2(a): consensus hopping (every particle redrawn around the
     consensus point each step: N = 200, sigma = 0.7, alpha = 100, 250
     steps), 50 runs.

2. ``success_rates``: what CBXpy users look at: the fraction of runs whose
   final consensus is within 0.25 (max-norm) of the global minimiser, against
   the number of particles and the dimension, on shifted Rastrigin and Ackley,
   for plain CBO, CBO with alpha annealing (x1.05 per step up to 1e5,
   CBXpy's default scheduler), with mini-batch interaction (only the batch
   moves, CBXpy's ``partial=True``) and with resampling on stagnation (every
   particle kicked once the consensus moved less than 1e-3 in each of the
   last 5 steps, CBXpy's ``consensus_stagnation``).

All runs of a configuration are one jitted ``vmap`` over the runs' seeds:
run ``r`` is ``zojax.cbo(..., seed=r)``, whose ``init`` places its particles
at ``start + init_std * z`` (once), followed by a ``lax.scan`` of steps.

  python experiments/cbo.py            # full run: JSON + PNGs in results/
  python experiments/cbo.py --quick    # small smoke run (ZOJAX_QUICK=1 too)
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import zojax
import harness
from harness import run_arguments

MINIMISER_TOLERANCE = 0.25


# ----------------------------------------------------------------- landscapes
def grand_canyon3_noisy(v: jax.Array) -> jax.Array:
  """The authors' 'GrandCanyon3noisy' (d = 2, global minimiser 0)."""
  x, y = v[0], v[1]
  valley = y - (2.0 / 16.0 * (x - 1.0) * (x - 4.0) ** 2 + 2.0)
  block = -x - 0.5 * 3.2 * y
  return (25.0 * (1.0 - jnp.exp(-1.4 * valley**2 * jnp.exp(-0.002 * x**4)))
          + 0.4 * x * x + 0.2 * y * y
          + 1.1625 * jnp.sum(1.0 - jnp.cos(0.75 * jnp.pi * v))
          + 4.0 * jnp.exp(1.0 - 2.0 * (valley**2) ** 2)
          * jnp.maximum((1.0 - jnp.exp(-9.0 * block**2)) * jnp.sign(block),
                        0.0))


def rastrigin(shift):
  def f(x):
    z = x - shift
    return 10.0 * z.size + jnp.sum(z**2 - 10.0 * jnp.cos(2 * jnp.pi * z))
  return f


def ackley(shift):
  def f(x):
    z = x - shift
    return (-20.0 * jnp.exp(-0.2 * jnp.sqrt(jnp.mean(z**2)))
            - jnp.exp(jnp.mean(jnp.cos(2 * jnp.pi * z))) + 20.0 + jnp.e)
  return f


# ------------------------------------------------------------------ CBO runs
def cbo_runs(objective, start, *, num_runs, num_steps, init_std, seed=0,
             **cbo_kwargs):
  """``num_runs`` independent CBO runs from ``start``; the consensus point
  after every step, shape ``(num_runs, num_steps, d)``."""
  params = {'x': jnp.asarray(start, jnp.float32)}
  obj_fn = lambda p: objective(p['x'])

  def one_run(run_seed):
    # a traced seed: each run's particles start at start + init_std * z_run
    tx = zojax.cbo(init_std=init_std, seed=run_seed, **cbo_kwargs)
    state = tx.init(params)

    def step(carry, _):
      p, s = carry
      updates, s = tx.update(None, s, p, obj_fn=obj_fn)
      p = optax.apply_updates(p, updates)
      return (p, s), p['x']

    return jax.lax.scan(step, (params, state), None, length=num_steps)[1]

  seeds = seed * num_runs + jnp.arange(num_runs)
  return jax.jit(jax.vmap(one_run))(seeds)


def gradient_runs(objective, start, *, num_runs, num_steps, dt, noise,
                  seed=0):
  """Gradient descent (``noise=0``) or annealed Langevin dynamics
  ``x <- x - dt grad f(x) + noise / log(k + 1) sqrt(dt) xi``; trajectories
  of shape ``(num_runs, num_steps, d)``."""
  grad = jax.grad(objective)

  def one_run(key):
    def step(x, inputs):
      k, step_key = inputs
      xi = jax.random.normal(step_key, x.shape)
      x = x - dt * grad(x) + noise / jnp.log(k + 1.0) * jnp.sqrt(dt) * xi
      return x, x
    steps = (jnp.arange(1, num_steps + 1, dtype=jnp.float32),
             jax.random.split(key, num_steps))
    return jax.lax.scan(step, jnp.asarray(start, jnp.float32), steps)[1]

  keys = jax.random.split(jax.random.PRNGKey(seed), num_runs)
  return jax.jit(jax.vmap(one_run))(keys)


def consensus_hopping_runs(objective, start, *, num_runs, num_steps,
                           num_particles, noise, alpha, seed=0):
  """Consensus hopping: all particles redrawn as ``v_alpha + noise * xi``
  every step (the authors' ``CH.m``); consensus after every step."""
  def one_run(key):
    init_key, key = jax.random.split(key)
    dim = len(start)
    particles = jnp.asarray(start) + noise * jax.random.normal(
        init_key, (num_particles, dim))

    def step(particles, step_key):
      weights = jax.nn.softmax(-alpha * jax.vmap(objective)(particles))
      consensus = weights @ particles
      particles = consensus + noise * jax.random.normal(step_key,
                                                        particles.shape)
      return particles, consensus

    return jax.lax.scan(step, particles, jax.random.split(key, num_steps))[1]

  keys = jax.random.split(jax.random.PRNGKey(seed), num_runs)
  return jax.jit(jax.vmap(one_run))(keys)


# ------------------------------------------------------------- experiments
def grand_canyon(num_runs: int, quick: bool) -> dict:
  start = np.array([8.0, 8.0])
  cbo_steps, gd_steps, ch_steps = (50, 500, 50) if quick else (250, 10_000,
                                                               250)
  out = {}
  out['cbo'] = cbo_runs(
      grand_canyon3_noisy, start, num_runs=num_runs, num_steps=cbo_steps,
      init_std=0.5, num_particles=200, alpha=100.0, drift=1.0, noise=1.6,
      dt=0.01, noise_kind='isotropic')
  out['gd'] = gradient_runs(grand_canyon3_noisy, start, num_runs=1,
                            num_steps=gd_steps, dt=1e-3, noise=0.0)
  out['langevin'] = gradient_runs(grand_canyon3_noisy, start,
                                  num_runs=num_runs, num_steps=gd_steps,
                                  dt=1e-3, noise=10.0)
  out['hopping'] = consensus_hopping_runs(
      grand_canyon3_noisy, start, num_runs=num_runs, num_steps=ch_steps,
      num_particles=200, noise=0.7, alpha=100.0)
  return {name: np.asarray(traj) for name, traj in out.items()}


VARIANTS = {
    'CBO': {},
    'CBO + alpha x1.05': {'alpha_growth': 1.05},
    'CBO + mini-batch (N/4)': {'particle_batch': 'quarter'},
    'CBO + resampling': {'resample_tol': 1e-3},
}


def success_rates(num_runs: int, particles, dims, num_steps: int) -> list:
  rows = []
  problems = {'rastrigin': rastrigin, 'ackley': ackley}
  for name, make in problems.items():
    for dim in dims:
      shift = jnp.full((dim,), 1.0)
      objective = make(shift)
      for n in particles:
        for variant, extra in VARIANTS.items():
          extra = dict(extra)
          if extra.get('particle_batch') == 'quarter':
            extra['particle_batch'] = n // 4
          trajectories = cbo_runs(
              objective, np.full(dim, 3.0), num_runs=num_runs,
              num_steps=num_steps, init_std=3.0, num_particles=n,
              alpha=30.0, drift=1.0, noise=1.0, dt=0.02,
              noise_kind='anisotropic', **extra)
          final = np.asarray(trajectories[:, -1])
          error = np.max(np.abs(final - np.asarray(shift)), axis=1)
          rows.append(dict(problem=name, dim=dim, particles=n,
                           variant=variant, runs=num_runs,
                           success=float(np.mean(error < MINIMISER_TOLERANCE)),
                           median_error=float(np.median(error))))
  return rows


# ------------------------------------------------------------------- figures
def plot_grand_canyon(trajectories: dict, path: str) -> None:
  import matplotlib.pyplot as plt
  xs = np.linspace(-2, 8, 300)
  grid = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2)
  values = np.asarray(jax.vmap(grand_canyon3_noisy)(jnp.asarray(grid)))
  values = values.reshape(len(xs), len(xs))
  panels = [('hopping', '(a) consensus hopping'),
            ('cbo', '(b) CBO: consensus point'),
            ('gd', '(c) gradient descent'),
            ('langevin', '(d) annealed Langevin')]
  fig, axes = plt.subplots(1, 4, figsize=(18, 4.6))
  for ax, (name, title) in zip(axes, panels):
    ax.contourf(xs, xs, values, 22, cmap='viridis', alpha=0.35)
    ax.contour(xs, xs, values, 22, linewidths=0.4, alpha=0.5)
    traj = trajectories[name]
    steps = traj.shape[1]
    shown = np.unique(np.linspace(0, steps - 1, 25).astype(int))
    colors = plt.cm.cool(np.linspace(0, 1, len(shown)))
    for c, k in zip(colors, shown):
      ax.scatter(traj[:, k, 0], traj[:, k, 1], s=10, color=c, alpha=0.6)
    ax.plot(0, 0, '*', color='red', ms=12, label='global minimiser')
    ax.set(xlim=(-2, 8), ylim=(-2, 8), title=title)
  axes[0].legend(loc='upper left')
  fig.suptitle('GrandCanyon3noisy: sample locations over the iterations '
               '(early = cyan, late = magenta)')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_success(rows: list, path: str) -> None:
  import matplotlib.pyplot as plt
  problems = sorted({r['problem'] for r in rows})
  dims = sorted({r['dim'] for r in rows})
  fig, axes = plt.subplots(len(problems), len(dims),
                           figsize=(4 * len(dims), 3.4 * len(problems)),
                           squeeze=False)
  for i, problem in enumerate(problems):
    for j, dim in enumerate(dims):
      ax = axes[i][j]
      for variant in VARIANTS:
        sel = [r for r in rows if r['problem'] == problem and
               r['dim'] == dim and r['variant'] == variant]
        ax.plot([r['particles'] for r in sel], [r['success'] for r in sel],
                'o-', label=variant)
      ax.set(xscale='log', ylim=(-0.05, 1.05), title=f'{problem}, d = {dim}',
             xlabel='particles N', ylabel='success rate')
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> dict:
  args = run_arguments(__doc__.splitlines()[0]).parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  start = time.time()
  runs = 10 if args.quick else 50
  trajectories = grand_canyon(runs, args.quick)
  final_error = {name: float(np.median(np.linalg.norm(t[:, -1], axis=1)))
                 for name, t in trajectories.items()}
  print('GrandCanyon3noisy, median distance of the final point to the '
        'minimiser:', {k: round(v, 3) for k, v in final_error.items()})
  plot_grand_canyon(trajectories, os.path.join(args.out,
                                               'cbo_grand_canyon.png'))
  if args.quick:
    rows = success_rates(8, particles=(32, 128), dims=(2,), num_steps=100)
  else:
    rows = success_rates(50, particles=(16, 64, 256, 1024), dims=(2, 5, 10),
                         num_steps=400)
  print('\n| problem | d | N | variant | success | median error |\n'
        '|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['problem']} | {r['dim']} | {r['particles']} | "
          f"{r['variant']} | {r['success']:.2f} | {r['median_error']:.3f} |")
  plot_success(rows, os.path.join(args.out, 'cbo_success.png'))
  result = {'quick': args.quick, 'grand_canyon_median_final_distance':
            final_error, 'success_rates': rows,
            'seconds': time.time() - start}
  with open(os.path.join(args.out, 'cbo.json'), 'w') as f:
    json.dump(result, f, indent=1)
  print(f'wrote {harness.shown(args.out)}/cbo.json, cbo_grand_canyon.png, '
        f'cbo_success.png ({result["seconds"]:.0f} s)')
  return result


if __name__ == '__main__':
  main()
