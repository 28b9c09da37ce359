r"""ZO-RankSGD: gradient estimates from a ranking oracle alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zojax._src import checks
from zojax._src import engine
from zojax._src.base import EstimatorState, ZerothOrderTransform, key_from_seed
from zojax._src.perturbable import Mask, Perturbable, check_params
from zojax._src.rge import random_directions
from zojax._src.stats import EstimateStats

RankFn = Callable[[Any], jax.Array]


def rank_weights(ranking: jax.Array, num_points: int,
                 top_k: int) -> tuple[jax.Array, jax.Array]:
  r"""The weight of each candidate's direction in the rank estimate.

  The comparison graph of a top-``k``-of-``m`` ranking has an edge
  :math:`i \succ j` ("i is better") for every ordered pair inside the top
  ``k`` (:math:`k(k-1)/2` edges) and from each top-``k`` item to each of the
  :math:`m-k` unranked ones (:math:`k(m-k)` edges). In
  :math:`\sum_{(i \succ j) \in E} (\xi_j - \xi_i)` the item ranked :math:`r`
  (0 = best) is the better end of :math:`(k-1-r) + (m-k)` edges and the worse
  end of :math:`r`, so its weight is :math:`2r + 1 - m = -(m-1-2r)`; an
  unranked item is the worse end of :math:`k` edges: weight :math:`+k`. The
  weights sum to zero (each edge adds +1 and -1).

  Args:
    ranking: candidate indices best-first (at least ``top_k`` of them; only
      the first ``top_k`` are used).
    num_points: :math:`m`.
    top_k: :math:`k`.

  Returns:
    ``(weights, valid)``: float32 weights of shape ``(m,)``, and whether the
    first ``top_k`` indices were distinct and in ``[0, m)``.
  """
  top = jnp.asarray(ranking)[:top_k].astype(jnp.int32)
  ranked_weights = (2.0 * jnp.arange(top_k, dtype=jnp.float32) + 1.0
                    - num_points)
  weights = jnp.full((num_points,), float(top_k), jnp.float32)
  weights = weights.at[top].set(ranked_weights, mode='drop')
  in_range = jnp.all((top >= 0) & (top < num_points))
  counts = jnp.zeros((num_points,), jnp.int32).at[top].add(1, mode='drop')
  return weights, in_range & jnp.all(counts <= 1)


def num_edges(num_points: int, top_k: int) -> int:
  """:math:`|E| = k(k-1)/2 + k(m-k)`."""
  return top_k * (top_k - 1) // 2 + top_k * (num_points - top_k)


def rank_estimator(
    num_points: int,
    top_k: int,
    sigma: float,
    *,
    mask: Mask = None,
    batch_size: int | None = None,
    seed=0,
) -> ZerothOrderTransform:
  r"""ZO-RankSGD's gradient estimate from a ranking of perturbed points.

  Each step draws :math:`\xi_1..\xi_m \sim N(0, I)` (:math:`m` =
  ``num_points``), shows the candidates :math:`x + \mu\xi_i` (:math:`\mu` =
  ``sigma``) to the ranking oracle ``rank_fn`` and builds the comparison
  graph :math:`E` of the returned top-:math:`k` ranking (see
  :func:`rank_weights`). The estimate is

  .. math::
    \hat g = \frac{1}{|E|} \sum_{(i \succ j) \in E} (\xi_j - \xi_i)
           = \frac{1}{|E|}\Big(\sum_{r=0}^{k-1} -(m-1-2r)\,\xi_{(r)}
             + k \sum_{\text{unranked } u} \xi_u\Big),
    \qquad |E| = \tfrac{k(k-1)}{2} + k(m-k),

  where :math:`i \succ j` means the oracle prefers :math:`x + \mu\xi_i`
  (a lower objective). It points along the gradient (so ``optax.sgd``
  descends), as in Algorithm 1 of Tang et al.; like the paper there is no
  :math:`1/\mu` factor: the estimate is a direction, its scale set by the
  learning rate. It depends on the ranking only, so it is unchanged when the
  hidden objective is replaced by any strictly increasing transform of it.

  Weights: ``m - 1 - 2r`` follows from the edge set above and makes the
  weights sum to zero. The authors' public Stable-Diffusion code
  (``optimizer.py`` of Taming-Stable-Diffusion-with-Human-Ranking-Feedback)
  uses ``m - 2r``, which adds :math:`k` times the mean of the top-:math:`k`
  directions, a zero-mean term that only adds variance; zojax implements the
  paper's graph.

  ``update(updates, state, params, *, rank_fn)``: ``rank_fn`` receives the
  stacked candidates (a pytree like ``params`` with a leading axis of
  :math:`m`) and returns candidate indices best-first, at least ``top_k`` of
  them (e.g. ``lambda c: jnp.argsort(jax.vmap(f)(c))``). An invalid ranking
  (repeated or out-of-range indices) gives a zero update, counted in
  ``estimate_info(state).skipped_steps``. ``estimate_info`` counts the
  :math:`m` ranked points per step; its ``value`` stays NaN (the objective is
  never observed).

  Ask/tell for oracles outside JAX (a person, a simulator)::

    est = zojax.rank_estimator(8, 3, 0.1)
    candidates = est.ask(key, params)            # leading axis 8
    ranking = my_oracle(candidates)              # e.g. [5, 0, 2]
    grad = est.tell(key, params, ranking)

  Args:
    num_points: :math:`m` >= 2 candidates per step.
    top_k: :math:`k`, 1 <= k <= m, how many the oracle ranks (``k = m`` for a
      full ranking, ``m = k = 2`` for a pairwise comparison).
    sigma: :math:`\mu` > 0, the perturbation size.
    mask: coordinates to perturb (see :mod:`zojax.masks`).
    batch_size: directions accumulated at once; ``None`` = all.
    seed: int seed or PRNG key.

  Returns:
    A :class:`zojax.ZerothOrderTransform` whose ``update`` needs ``rank_fn``.

  References:
    Tang, Rybin & Chang, Zeroth-Order Optimization Meets Human Feedback:
    Provable Learning via Ranking Oracles, ICLR 2024.
  """
  _validate_counts(num_points, top_k)
  checks.validate_sigma(sigma)
  checks.validate_positive_int('batch_size', batch_size, allow_none=True)
  initial_key = key_from_seed(seed)
  sigmas = jnp.asarray([sigma], jnp.float32)

  def directions_for(key, params):
    space = Perturbable.build(params, mask)
    directions = random_directions(key, space, num_points, 'gaussian')
    return directions._replace(scale=1.0 / num_edges(num_points, top_k))

  def ask(key, params):
    return engine.stacked_points(directions_for(key, params), sigmas)

  def estimate(key, params, ranking):
    directions = directions_for(key, params)
    weights, valid = rank_weights(ranking, num_points, top_k)
    accumulated, _ = engine.weighted_direction_sum(
        directions, lambda i, d: (weights[i], ()), batch_size)
    return engine.finish_estimate(directions, accumulated, valid), valid

  def init_fn(params):
    check_params(params)
    Perturbable.build(params, mask)
    return EstimatorState(initial_key, EstimateStats.create(num_points))

  def update_fn(updates, state, params=None, *, rank_fn=None, **extra_args):
    del updates, extra_args
    _require_rank_fn('rank_estimator', params, rank_fn)
    key, step_key = jax.random.split(state.key)
    candidates = ask(step_key, params)
    ranking = _checked_ranking(rank_fn, candidates, top_k)
    grad, valid = estimate(step_key, params, ranking)
    return grad, EstimatorState(key, state.stats.record(jnp.nan, valid))

  def tell(key, params, ranking):
    ranking = np.asarray(ranking)
    _check_concrete_ranking(ranking, num_points, top_k)
    return estimate(key, params, jnp.asarray(ranking, jnp.int32))[0]

  return ZerothOrderTransform(init_fn, update_fn, ask=ask, tell=tell)


def zo_ranksgd(
    learning_rate: optax.ScalarOrSchedule,
    num_points: int = 10,
    top_k: int = 5,
    sigma: float = 0.1,
    *,
    line_search_steps: int = 0,
    mask: Mask = None,
    batch_size: int | None = None,
    seed=0,
) -> optax.GradientTransformationExtraArgs:
  r"""ZO-RankSGD: :math:`x \leftarrow x - \eta\,\hat g` with the rank estimate.

  :func:`rank_estimator` followed by ``optax.sgd(learning_rate)``, and with
  ``line_search_steps=L > 0`` by :func:`rank_line_search` (the oracle then
  also ranks :math:`x - 2^{-j}\eta\hat g`, :math:`j < L`, and :math:`x`;
  the best is taken). ``update`` needs ``rank_fn``. Per step the oracle is
  called once (twice with the line search) and ranks ``num_points`` (plus
  ``L + 1``) points, all counted by ``estimate_info``.

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    num_points, top_k, sigma: as in :func:`rank_estimator` (defaults: the
      paper's synthetic setting m = 10, mu = 0.1, with k = 5).
    line_search_steps: :math:`L`, 0 for none.
    mask, batch_size, seed: as in :func:`rank_estimator`.

  References:
    Tang, Rybin & Chang, ICLR 2024.
  """
  checks.validate_positive_int('line_search_steps', line_search_steps + 1)
  parts = [rank_estimator(num_points, top_k, sigma, mask=mask,
                          batch_size=batch_size, seed=seed),
           optax.sgd(learning_rate)]
  if line_search_steps:
    parts.append(rank_line_search(line_search_steps))
  return optax.chain(*parts)


class RankLineSearchState(NamedTuple):
  stats: EstimateStats


def rank_line_search(num_steps: int) -> optax.GradientTransformationExtraArgs:
  r"""Line search by ranking: the best of :math:`x + 2^{-j} u` and :math:`x`.

  Given the incoming update :math:`u` (e.g. :math:`-\eta \hat g`), shows the
  oracle the ``num_steps`` candidates :math:`x + 2^{-j} u`,
  :math:`j = 0..L-1`, and :math:`x` itself (one ``rank_fn`` call on
  :math:`L + 1` points) and returns the step to the one ranked best (zero if
  it is :math:`x`, so a step never makes things worse in the oracle's eyes).
  This is the line search of ZO-RankSGD's Stable-Diffusion application
  (Tang et al., section 5). Each step counts :math:`L + 1` ranked points in
  ``estimate_info``.

  Args:
    num_steps: :math:`L` >= 1 step sizes tried.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` needing ``rank_fn``.
  """
  checks.validate_positive_int('num_steps', num_steps)
  fractions = jnp.concatenate([0.5 ** jnp.arange(num_steps, dtype=jnp.float32),
                               jnp.zeros((1,), jnp.float32)])

  def init_fn(params):
    del params
    return RankLineSearchState(EstimateStats.create(num_steps + 1))

  def update_fn(updates, state, params=None, *, rank_fn=None, **extra_args):
    del extra_args
    _require_rank_fn('rank_line_search', params, rank_fn)
    candidates = jax.vmap(lambda f: jax.tree.map(
        lambda p, u: (p + f * u).astype(jnp.result_type(p)), params,
        updates))(fractions)
    ranking = _checked_ranking(rank_fn, candidates, 1)
    best = ranking[0]
    valid = (best >= 0) & (best <= num_steps)
    factor = jnp.where(valid, fractions[jnp.clip(best, 0, num_steps)], 0.0)
    new_updates = jax.tree.map(lambda u: (factor * u).astype(u.dtype),
                               updates)
    return new_updates, RankLineSearchState(state.stats.record(jnp.nan,
                                                               valid))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _validate_counts(num_points, top_k):
  checks.validate_positive_int('num_points', num_points)
  checks.validate_positive_int('top_k', top_k)
  if num_points < 2:
    raise ValueError(f'num_points must be >= 2, got {num_points}.')
  if top_k > num_points:
    raise ValueError(f'top_k ({top_k}) must be <= num_points ({num_points}).')


def _require_rank_fn(name, params, rank_fn):
  if params is None:
    raise ValueError(f'{name}: params must be passed to update().')
  if rank_fn is None:
    raise ValueError(
        f'{name}: update() needs the ranking oracle as the extra argument '
        '`rank_fn=lambda candidates: indices_best_first`.')


def _checked_ranking(rank_fn: RankFn, candidates, top_k: int) -> jax.Array:
  """Calls ``rank_fn``; raises a clear error unless it returns >= top_k ints."""
  out = jax.eval_shape(rank_fn, candidates)
  shape, dtype = getattr(out, 'shape', None), getattr(out, 'dtype', None)
  if (shape is None or len(shape) != 1 or shape[0] < top_k
      or not jnp.issubdtype(dtype, jnp.integer)):
    raise ValueError(
        f'rank_fn must return a vector of at least {top_k} integer candidate '
        f'indices, best first; it returned {shape} {dtype}.')
  return rank_fn(candidates)


def _check_concrete_ranking(ranking: np.ndarray, num_points: int,
                            top_k: int) -> None:
  top = ranking[:top_k]
  if (ranking.ndim != 1 or len(top) < top_k
      or not np.issubdtype(ranking.dtype, np.integer)
      or np.any((top < 0) | (top >= num_points))
      or len(np.unique(top)) != top_k):
    raise ValueError(
        f'tell expects at least {top_k} distinct candidate indices in '
        f'[0, {num_points}), best first; got {ranking.tolist()}.')
