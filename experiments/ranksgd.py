"""ZO-RankSGD's synthetic experiments: loss against oracle queries.

The setting of the authors' exploratory notebooks (TZW1998/rank_opt): d = 100,
a convex quadratic x^T A x + b^T x with A = G G^T (G 100 x 50) and the
Rosenbrock function, m = 10 points per step, mu = 0.1, 10 repetitions from
the same N(0, I) start. One choice differs: the authors draw b at random,
which leaves the quadratic unbounded below along the null space of A; here
b = G c, so the minimum exists and the optimality gap is defined.

Methods, all spending 10 points of the oracle per step (the authors'
protocol with line search: 14):

* ZO-RankSGD, full ranking (k = 10) and top-5 (``zojax.zo_ranksgd``: the
  paper's Algorithm 1, Gaussian directions, graph weights, SGD from x with
  a tuned step size),
* ZO-RankSGD with the estimator of the authors' notebooks
  (``zojax.rank_estimator(distribution='sphere', include_center=True,
  normalize=True)``: x among the 10 candidates, 9 points at distance mu,
  normalised edges and estimate), first with a tuned SGD step from x, then
  in the notebooks' protocol: a fixed step of 1 from the best-ranked
  candidate, or the 4-step halving line search from it (best of
  best - 2^-j g, j < 4, ranked by the oracle),
* ZO-SGD on values (``zojax.rge``, 9 forward differences + f(x)),
* ZO-SignSGD, comparison-based (``zojax.zo_sign_sgd``, 5 directions, the
  sign of f(x + mu u) - f(x - mu u): a pairwise comparison each),
* GLD, gradientless descent (Golovin et al., 2020): 10 points at radii
  R 2^-j around x, move to the best if it beats x (needs comparisons only),
* CMA-ES with population 10 (the ``cma`` package, off the shelf).

Then policy optimization from episode-return rankings (the paper's MuJoCo
experiments, here on gymnax's JAX-native CartPole-v1): a linear policy, one
episode per candidate (all candidates of a step share the episode's random
start), ZO-RankSGD ranking the 10 candidates by return against ZO-SGD on the
returns, CMA-ES, Deep GA (``zojax.ga``, population 10) and CBO
(``zojax.cbo``, 9 particles + the consensus = 10 episodes), the last three
minimising the negative return; 5 repetitions.

Every method's step size is tuned on a grid (the best mean final loss over
the repetitions is kept; CMA-ES tunes its initial sigma, GLD its radius,
Deep GA its mutation power, CBO its noise). Reports the loss curves (mean
and spread), the oracle points each method needs to close 90% (quadratic)
or 50% (Rosenbrock) of the initial gap, the wall time of one jitted
ZO-RankSGD step with m = 64 on the CPU, and a Monte-Carlo check of the
authors' Stable-Diffusion weights m - 2r against the graph's m - 1 - 2r.

  python experiments/ranksgd.py            # full run: JSON + PNG in results/
  python experiments/ranksgd.py --quick    # small smoke run (ZOJAX_QUICK=1)
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

import zojax
import harness
from harness import run_arguments

POINTS_PER_STEP = 10
MU = 0.1
LEARNING_RATES = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2,
                  0.1, 0.3, 1.0, 3.0)


# ------------------------------------------------------------------ problems
def quadratic(dim: int = 100, seed: int = 0):
  """x^T A x + b^T x, A = G G^T (G: dim x dim/2), b = G c; and its minimum."""
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(dim, dim // 2))
  a = g @ g.T
  b = g @ rng.normal(size=dim // 2)
  x_star = -0.5 * np.linalg.pinv(a) @ b
  f_star = float(x_star @ a @ x_star + b @ x_star)
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return (lambda x: x @ a @ x + b @ x), f_star


def rosenbrock(x):
  return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


# Fraction of the initial optimality gap a method must close (the target).
TARGET_FRACTIONS = {'quadratic': 0.9, 'rosenbrock': 0.5}


def problem(name: str):
  """``(f, f_star)`` of a named problem."""
  return quadratic() if name == 'quadratic' else (rosenbrock, 0.0)


# ----------------------------------------------------------- zojax methods
def rank_oracle(f):
  return lambda candidates: jnp.argsort(jax.vmap(lambda c: f(c['x']))(
      candidates))


def authors_estimator():
  """The estimator of the authors' notebooks: x and 9 points on the sphere of
  radius mu, fully ranked, normalised edge differences, a unit-norm
  estimate."""
  return zojax.rank_estimator(POINTS_PER_STEP, POINTS_PER_STEP, MU,
                              distribution='sphere', include_center=True,
                              normalize=True)


def method_transforms(lr):
  """name -> (transform, which oracle its update needs)."""
  return {
      'ZO-RankSGD (k=10)': (zojax.zo_ranksgd(lr, 10, 10, MU), 'rank'),
      'ZO-RankSGD (k=5)': (zojax.zo_ranksgd(lr, 10, 5, MU), 'rank'),
      "ZO-RankSGD, authors' estimator (k=10)": (
          optax.chain(authors_estimator(), optax.sgd(lr)), 'rank'),
      'ZO-SGD (values)': (optax.chain(zojax.rge(9, MU), optax.sgd(lr)),
                          'value'),
      'ZO-SignSGD (comparisons)': (zojax.zo_sign_sgd(lr, MU, 5), 'value'),
  }


def run_transform(tx, oracle, f, x0, steps, reps):
  """Losses after each step, shape (reps, steps + 1); reps differ by seed."""
  params = {'x': jnp.asarray(x0, jnp.float32)}
  obj_fn = lambda p: f(p['x'])
  extra = ({'rank_fn': rank_oracle(f)} if oracle == 'rank'
           else {'obj_fn': obj_fn})
  template = tx.init(params)

  def one_rep(key):
    # A different key in every zojax state of the chain = a different seed.
    state = _rekey(template, key)

    def step(carry, _):
      p, s = carry
      updates, s = tx.update(None, s, p, **extra)
      p = optax.apply_updates(p, updates)
      return (p, s), obj_fn(p)

    losses = jax.lax.scan(step, (params, state), None, length=steps)[1]
    return jnp.concatenate([obj_fn(params)[None], losses])

  keys = jax.random.split(jax.random.PRNGKey(1), reps)
  return np.asarray(jax.jit(jax.vmap(one_rep))(keys))


def _rekey(state, key):
  def swap(node):
    if isinstance(node, zojax.EstimatorState):
      return node._replace(key=key)
    return node
  return jax.tree.map(swap, state,
                      is_leaf=lambda n: isinstance(n, zojax.EstimatorState))


def run_authors_protocol(f, x0, steps, reps, line_search_steps):
  """The notebooks' loop (comparing_ES_like_and_rank.ipynb): the unit-norm
  estimate g of :func:`authors_estimator`, then x <- best - g from the
  best-ranked candidate (step 1), or with ``line_search_steps = L`` the
  best (ranked by the oracle) of best - 2^-j g, j < L. Losses after each
  step, shape (reps, steps + 1)."""
  est = authors_estimator()
  rank_fn = rank_oracle(f)
  fractions = 0.5 ** jnp.arange(line_search_steps, dtype=jnp.float32)
  template = est.init({'x': jnp.asarray(x0, jnp.float32)})

  def one_rep(key):
    def step(carry, _):
      x, state = carry
      candidates = est.ask(state, {'x': x})
      ranking = rank_fn(candidates)
      g, state = est.tell(state, {'x': x}, candidates, ranking)
      best = candidates['x'][ranking[0]]
      if line_search_steps:
        trials = best[None] - fractions[:, None] * g['x'][None]
        best = trials[rank_fn({'x': trials})[0]]
      else:
        best = best - g['x']
      return (best, state), f(best)

    x = jnp.asarray(x0, jnp.float32)
    losses = jax.lax.scan(step, (x, _rekey(template, key)), None,
                          length=steps)[1]
    return jnp.concatenate([f(x)[None], losses])

  keys = jax.random.split(jax.random.PRNGKey(1), reps)
  return np.asarray(jax.jit(jax.vmap(one_rep))(keys))


def run_gld(f, x0, steps, reps, radius):
  """Gradientless descent: 10 candidates x + R 2^-j u_j (u_j uniform on the
  sphere); x moves to the best one if it is better than x."""
  radii = radius * 0.5 ** jnp.arange(POINTS_PER_STEP, dtype=jnp.float32)

  def one_rep(key):
    def step(x, step_key):
      u = jax.random.normal(step_key, (POINTS_PER_STEP, x.shape[0]))
      u = u / jnp.linalg.norm(u, axis=1, keepdims=True)
      candidates = x + radii[:, None] * u
      values = jax.vmap(f)(candidates)
      best = jnp.argmin(values)
      x = jnp.where(values[best] < f(x), candidates[best], x)
      return x, f(x)
    x = jnp.asarray(x0, jnp.float32)
    losses = jax.lax.scan(step, x, jax.random.split(key, steps))[1]
    return jnp.concatenate([f(x)[None], losses])

  keys = jax.random.split(jax.random.PRNGKey(2), reps)
  return np.asarray(jax.jit(jax.vmap(one_rep))(keys))


def run_cmaes(f, x0, steps, reps, sigma0):
  import cma
  f_np = jax.jit(jax.vmap(f))
  curves = []
  for rep in range(reps):
    es = cma.CMAEvolutionStrategy(np.asarray(x0), sigma0, {
        'popsize': POINTS_PER_STEP, 'seed': rep + 1, 'verbose': -9})
    losses = [float(f(jnp.asarray(x0, jnp.float32)))]
    for _ in range(steps):
      candidates = es.ask()
      es.tell(candidates, np.asarray(f_np(jnp.asarray(np.array(candidates),
                                                      jnp.float32))).tolist())
      losses.append(float(f(jnp.asarray(es.mean, jnp.float32))))
    curves.append(losses)
  return np.asarray(curves)


def best_over(grid, run):
  """The run with the lowest mean final loss over a grid of settings."""
  results = {value: run(value) for value in grid}
  chosen = min(results, key=lambda v: np.nanmean(results[v][:, -1])
               if np.all(np.isfinite(results[v][:, -1])) else np.inf)
  return chosen, results[chosen]


def _std(curves):
  with np.errstate(invalid='ignore'):  # diverged runs hold inf
    return curves.std(0)


def points_to_target(curve_mean, target, points_per_step=POINTS_PER_STEP):
  hit = np.flatnonzero(curve_mean <= target)
  return int(hit[0]) * points_per_step if hit.size else None


def step_time_m64(repeats: int = 20) -> float:
  """Seconds per jitted ZO-RankSGD step, m = 64, on a 100-d quadratic."""
  f, _ = quadratic()
  tx = zojax.zo_ranksgd(1e-3, 64, 16, MU)
  params = {'x': jnp.ones(100, jnp.float32)}
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    updates, s = tx.update(None, s, p, rank_fn=rank_oracle(f))
    return optax.apply_updates(p, updates), s

  jax.block_until_ready(step(params, state))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(params, state))
    best = min(best, time.perf_counter() - start)
  return best


def reference_weights_check(num_draws: int, dim: int = 100, m: int = 10,
                            k: int = 5) -> dict:
  r"""E[g]^T grad f, E||g||^2 and E[cos(g, grad f)] of the rank estimate
  with the graph weights -(m-1-2r) and the authors' Stable-Diffusion
  weights -(m-2r), for a linear objective with unit gradient (the ranking,
  hence g, does not depend on mu there). Means over ``num_draws`` keys,
  with their standard errors."""
  u = jnp.ones(dim, jnp.float32) / np.sqrt(dim)
  params = {'x': jnp.zeros(dim, jnp.float32)}
  rank_fn = lambda c: jnp.argsort(c['x'] @ u)
  keys = jax.random.split(jax.random.PRNGKey(11), num_draws)
  out = {}
  for weights in ('graph', 'reference'):
    tx = zojax.rank_estimator(m, k, MU, weights=weights)
    state = tx.init(params)
    draw = lambda key: tx.update(None, state._replace(key=key), params,
                                 rank_fn=rank_fn)[0]['x']
    g = np.asarray(jax.jit(lambda ks: jax.lax.map(
        draw, ks, batch_size=1000))(keys), np.float64)
    along, squared = g @ np.asarray(u), np.sum(g ** 2, axis=1)
    out[weights] = {
        name: [float(v.mean()), float(v.std() / np.sqrt(num_draws))]
        for name, v in (('mean_along_gradient', along),
                        ('mean_squared_norm', squared),
                        ('mean_cosine', along / np.sqrt(squared)))}
  return {'dim': dim, 'num_points': m, 'top_k': k, 'draws': num_draws,
          **out}


# ------------------------------------------------- policy optimization
def episode_return(policy, key, env, env_params):
  """Undiscounted return of one episode of the deterministic linear policy
  ``argmax(obs @ w + b)`` (CartPole-v1: at most 500 steps)."""
  obs, state = env.reset(key, env_params)

  def step(carry, step_key):
    obs, state, alive, total = carry
    action = jnp.argmax(obs @ policy['w'] + policy['b'])
    obs, state, reward, terminated, truncated, _ = env.step(
        step_key, state, action, env_params)
    total = total + alive * reward
    alive = alive * (1.0 - jnp.maximum(terminated, truncated))
    return (obs, state, alive, total), None

  keys = jax.random.split(key, env_params.max_steps_in_episode)
  carry = (obs, state, jnp.float32(1.0), jnp.float32(0.0))
  return jax.lax.scan(step, carry, keys)[0][3]


def policy_transform(method: str, setting: float, seed):
  """The zojax transform of a policy method and the oracle it needs."""
  if method.startswith('ZO-RankSGD'):
    return zojax.zo_ranksgd(setting, 10, 5, MU, seed=seed), 'rank'
  if method.startswith('Deep GA'):  # setting: the truncation T
    return zojax.ga(POINTS_PER_STEP, GA_SIGMA, truncation=setting,
                    seed=seed), 'value'
  if method.startswith('CBO'):  # 9 particles + the consensus: 10 episodes
    return zojax.cbo(POINTS_PER_STEP - 1, noise=setting, **CBO_SETTINGS,
                     seed=seed), 'value'
  return optax.chain(zojax.rge(9, MU, seed=seed), optax.sgd(setting)), 'value'


def policy_runs(method: str, setting: float, steps: int, reps: int):
  """Mean episode return of the current policy after each step (evaluated
  on 10 fresh episodes), shape (reps, steps + 1). Ranking methods rank the
  candidates by return; the others minimise the negative return."""
  import gymnax
  env, env_params = gymnax.make('CartPole-v1')
  returns = lambda p, key: episode_return(p, key, env, env_params)
  policy = {'w': jnp.zeros((4, 2), jnp.float32),
            'b': jnp.zeros((2,), jnp.float32)}

  def evaluate(p, key):
    return jnp.mean(jax.vmap(lambda k: returns(p, k))(
        jax.random.split(key, 10)))

  if method == 'CMA-ES (pop 10)':
    return _policy_cmaes(returns, evaluate, policy, setting, steps, reps)

  def one_rep(key):
    tx, oracle = policy_transform(method, setting, key)

    def step(carry, step_key):
      p, s = carry
      episode_key, eval_key = jax.random.split(step_key)
      if oracle == 'rank':
        rank_fn = lambda c: jnp.argsort(-jax.vmap(
            lambda q: returns(q, episode_key))(c))
        updates, s = tx.update(None, s, p, rank_fn=rank_fn)
      else:
        updates, s = tx.update(None, s, p,
                               obj_fn=lambda q: -returns(q, episode_key))
      p = optax.apply_updates(p, updates)
      return (p, s), evaluate(p, eval_key)

    start = evaluate(policy, jax.random.fold_in(key, 1))
    curve = jax.lax.scan(step, (policy, tx.init(policy)),
                         jax.random.split(key, steps))[1]
    return jnp.concatenate([start[None], curve])

  keys = jax.random.split(jax.random.PRNGKey(3), reps)
  return np.asarray(jax.jit(jax.vmap(one_rep))(keys))


def _policy_cmaes(returns, evaluate, policy, sigma0, steps, reps):
  import cma
  flat0, unravel = jax.flatten_util.ravel_pytree(policy)
  batch_returns = jax.jit(lambda xs, key: jax.vmap(
      lambda x: returns(unravel(x), key))(xs))
  evaluate_flat = jax.jit(lambda x, key: evaluate(unravel(x), key))
  curves = []
  for rep in range(reps):
    key = jax.random.PRNGKey(100 + rep)
    es = cma.CMAEvolutionStrategy(np.asarray(flat0), sigma0, {
        'popsize': POINTS_PER_STEP, 'seed': rep + 1, 'verbose': -9})
    curve = [float(evaluate_flat(flat0, key))]
    for step in range(steps):
      episode_key, eval_key = jax.random.split(jax.random.fold_in(key, step))
      candidates = np.array(es.ask())
      es.tell(list(candidates), (-np.asarray(batch_returns(
          jnp.asarray(candidates, jnp.float32), episode_key))).tolist())
      curve.append(float(evaluate_flat(jnp.asarray(es.mean, jnp.float32),
                                       eval_key)))
    curves.append(curve)
  return np.asarray(curves)


# The policy argmax(obs @ w + b) is unchanged when (w, b) is scaled and every
# run starts at zero, so Deep GA's trajectory does not depend on its
# mutation power (nor CMA-ES's on sigma0, nor CBO's on init_std): Deep GA
# tunes its truncation instead. CBO's alpha and dt were picked in a pilot
# run (alpha = 10, dt = 0.1 stayed below a mean return of 420).
GA_SIGMA = 0.1
CBO_SETTINGS = {'alpha': 0.1, 'dt': 0.3}
POLICY_METHODS = {
    'ZO-RankSGD (k=5)': (0.1, 0.3, 1.0, 3.0),
    'ZO-SGD (values)': (1e-3, 3e-3, 1e-2, 3e-2),
    'CMA-ES (pop 10)': (0.1, 0.3, 1.0),
    'Deep GA (pop 10)': (2, 3, 5),
    'CBO (9 particles)': (0.3, 0.5, 1.0),
}


def policy_optimization(quick: bool) -> dict:
  steps, reps = (10, 2) if quick else (60, 5)
  out = {}
  for method, grid in POLICY_METHODS.items():
    grid = grid[1:2] if quick else grid
    results = {g: policy_runs(method, g, steps, reps) for g in grid}
    # The best final mean return; ties (several at 500) by the mean over
    # the whole run.
    best = max(results, key=lambda g: (results[g][:, -1].mean(),
                                       results[g].mean()))
    curve = results[best]
    hit = np.flatnonzero(curve.mean(0) >= 475.0)
    out[method] = {'setting': best, 'mean': curve.mean(0).tolist(),
                   'std': curve.std(0).tolist(),
                   'final_return': float(curve[:, -1].mean()),
                   'episodes_to_475': int(hit[0]) * POINTS_PER_STEP
                   if hit.size else None}
  return out


def plot_policy(results: dict, path: str) -> None:
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for method, m in results.items():
    mean, std = np.asarray(m['mean']), np.asarray(m['std'])
    episodes = np.arange(len(mean)) * POINTS_PER_STEP
    ax.plot(episodes, mean, '-' if 'Rank' in method else '--', label=method)
    ax.fill_between(episodes, mean - std, mean + std, alpha=0.15)
  ax.set(xlabel='training episodes (10 per step)', ylabel='mean return',
         title='CartPole-v1 (gymnax), linear policy')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# Oracle points per step of the authors' protocol with its line search.
LINE_SEARCH_STEPS = 4
AUTHORS_PROTOCOL = {"ZO-RankSGD, authors' protocol (step 1)": 0,
                    "ZO-RankSGD, authors' protocol (line search)":
                        LINE_SEARCH_STEPS}


def synthetic_curves(f, x0, steps, reps, quick):
  """name -> (setting, losses (reps, *), oracle points per step)."""
  lrs = (1e-2,) if quick else LEARNING_RATES
  out = {}
  for method in method_transforms(1.0):
    out[method] = best_over(
        lrs, lambda lr, method=method: run_transform(
            *method_transforms(lr)[method], f, x0, steps, reps)) + (
                POINTS_PER_STEP,)
  for method, searches in AUTHORS_PROTOCOL.items():
    per_step = POINTS_PER_STEP + searches
    out[method] = ('1 (fixed)', run_authors_protocol(
        f, x0, steps * POINTS_PER_STEP // per_step, reps, searches),
                   per_step)
  out['GLD'] = best_over(
      (0.1, 1.0, 3.0, 10.0, 30.0) if not quick else (1.0,),
      lambda r: run_gld(f, x0, steps, reps, r)) + (POINTS_PER_STEP,)
  out['CMA-ES (pop 10)'] = best_over(
      (0.1, 0.3, 1.0) if not quick else (0.3,),
      lambda s: run_cmaes(f, x0, steps, reps, s)) + (POINTS_PER_STEP,)
  return out


def run_all(quick: bool) -> dict:
  steps, reps = (40, 3) if quick else (300, 10)
  x0 = np.random.default_rng(0).normal(size=100)
  out = {}
  for name in ('quadratic',) if quick else TARGET_FRACTIONS:
    f, f_star = problem(name)
    curves = synthetic_curves(f, x0, steps, reps, quick)
    f0 = float(f(jnp.asarray(x0, jnp.float32)))
    fraction = TARGET_FRACTIONS[name]
    target = f0 - fraction * (f0 - f_star)
    out[name] = {
        'f0': f0, 'f_star': f_star, 'target': target,
        'target_fraction_of_gap': fraction,
        'methods': {
            method: {'setting': setting, 'points_per_step': per_step,
                     'mean': curve.mean(0).tolist(),
                     'std': _std(curve).tolist(),
                     'final_gap_mean': float(curve[:, -1].mean() - f_star),
                     'final_gap_median': float(np.median(curve[:, -1])
                                               - f_star),
                     'points_to_target': points_to_target(
                         curve.mean(0), target, per_step)}
            for method, (setting, curve, per_step) in curves.items()}}
  return out


def plot(results: dict, path: str) -> None:
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5))
  for ax, (problem, res) in zip(np.atleast_1d(axes), results.items()):
    for name, m in res['methods'].items():
      mean = np.asarray(m['mean']) - res['f_star']
      std = np.asarray(m['std'])
      points = np.arange(len(mean)) * m['points_per_step']
      style = ':' if 'authors' in name else '-' if 'Rank' in name else '--'
      ax.plot(points, mean, style, label=name)
      ax.fill_between(points, np.maximum(mean - std, 1e-12), mean + std,
                      alpha=0.15)
    ax.set(yscale='log', xlabel='oracle points',
           ylabel='f(x) - f*', title=f'{problem}, d = 100')
  np.atleast_1d(axes)[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def print_synthetic(results: dict) -> None:
  for problem, res in results.items():
    print(f'\n{problem}: f0 = {res["f0"]:.4g}, f* = {res["f_star"]:.4g}, '
          f'target = close {100 * res["target_fraction_of_gap"]:.0f}% of the '
          'gap\n| method | tuned setting | points per step | points to '
          'target | final gap (mean) | final gap (median) |\n'
          '|---|---|---|---|---|---|')
    for name, m in res['methods'].items():
      print(f"| {name} | {m['setting']} | {m['points_per_step']} | "
            f"{m['points_to_target'] or '—'} | {m['final_gap_mean']:.4g} | "
            f"{m['final_gap_median']:.4g} |")


def print_weights(check: dict) -> None:
  print(f"\nrank weights, linear objective with unit gradient, d = "
        f"{check['dim']}, m = {check['num_points']}, k = {check['top_k']}, "
        f"{check['draws']:,} draws (mean ± standard error)\n| weights | "
        'E[g].grad f | E||g||^2 | E[cos(g, grad f)] |\n|---|---|---|---|')
  for weights in ('graph', 'reference'):
    cells = ' | '.join(f'{mean:.4f} ± {error:.4f}' for mean, error in (
        check[weights][name] for name in (
            'mean_along_gradient', 'mean_squared_norm', 'mean_cosine')))
    print(f'| {weights} | {cells} |')


def print_policy(policy: dict) -> None:
  print('\nCartPole-v1, linear policy: episodes to a mean return of 475, '
        'final mean return\n| method | tuned setting | episodes to 475 | '
        'final return |\n|---|---|---|---|')
  for method, m in policy.items():
    print(f"| {method} | {m['setting']} | {m['episodes_to_475'] or '—'} | "
          f"{m['final_return']:.1f} |")


def main(argv=None) -> dict:
  args = run_arguments(__doc__.splitlines()[0]).parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  start = time.time()
  results = run_all(args.quick)
  step_s = step_time_m64(5 if args.quick else 20)
  print(f'one jitted ZO-RankSGD step, m = 64, d = 100, CPU: '
        f'{1e3 * step_s:.3f} ms')
  print_synthetic(results)
  plot(results, os.path.join(args.out, 'ranksgd.png'))
  weights = reference_weights_check(1_000 if args.quick else 100_000)
  print_weights(weights)
  policy = policy_optimization(args.quick)
  print_policy(policy)
  plot_policy(policy, os.path.join(args.out, 'ranksgd_policy.png'))
  summary = {'quick': args.quick, 'step_ms_m64_cpu': 1e3 * step_s,
             'results': results, 'rank_weights': weights, 'policy': policy,
             'seconds': time.time() - start}
  with open(os.path.join(args.out, 'ranksgd.json'), 'w') as f:
    json.dump(summary, f)
  print(f'wrote {harness.shown(args.out)}/ranksgd.json, ranksgd.png, '
        f'ranksgd_policy.png ({summary["seconds"]:.0f} s)')
  return summary


if __name__ == '__main__':
  main()
