r"""ZO-RankSGD: gradient estimates from a ranking oracle alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from zojax._src.core import checks
from zojax._src.core import keys
from zojax._src.core.base import EstimatorState, ZerothOrderTransform
from zojax._src.core.perturbable import Mask, Perturbable, check_params
from zojax._src.core.stats import EstimateStats
from zojax._src.query import directions as directions_lib
from zojax._src.query import engine
from zojax._src.query import probes

RankFn = Callable[[Any], jax.Array]
DISTRIBUTIONS = ('gaussian', 'sphere')
WEIGHTS = ('graph', 'reference')


def rank_estimator(
    num_points: int,
    top_k: int,
    sigma: float,
    *,
    distribution: str = 'gaussian',
    include_center: bool = False,
    normalize: bool = False,
    weights: str = 'graph',
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

  The authors' code makes other choices, offered as options (defaults: the
  paper's Algorithm 1):

  * ``distribution='sphere'``: :math:`\xi_i` uniform on the unit sphere
    (their exploratory notebooks, TZW1998/rank_opt: candidates at distance
    :math:`\mu` from :math:`x`).
  * ``include_center=True``: candidate 0 is :math:`x` itself
    (:math:`\xi_0 = 0`), ranked with the :math:`m - 1` perturbed ones (the
    notebooks' ``query_list = [x] + ...``).
  * ``normalize=True``: every edge difference is normalised and so is the
    sum, :math:`\hat g = s / \|s\|` with :math:`s = \sum_{(i \succ j) \in E}
    (\xi_j - \xi_i) / \|\xi_j - \xi_i\|` (the notebooks; :math:`\hat g = 0`
    if :math:`s = 0`). A unit step then has length 1 whatever the
    objective's scale. The pairwise distances come from the Gram matrix of
    the :math:`m` directions, which this option materialises.
  * ``weights='reference'``: the weights of the authors' Stable-Diffusion
    code (``optimizer.py`` of Taming-Stable-Diffusion-with-Human-Ranking-
    Feedback), :math:`-(m - 2r)` for rank :math:`r` instead of
    :math:`-(m-1-2r)`: they add :math:`-\frac{1}{|E|}\sum_{r<k}
    \xi_{(r)}`, minus the :math:`k` best candidates' directions, a term that
    is not zero-mean (the best candidates lean against the gradient). For a
    linear objective with unit gradient, :math:`d = 100`, :math:`m = 10`,
    :math:`k = 5`, 100,000 draws: :math:`E[\hat g]^\top\nabla f` = 1.254
    (graph) and 1.360 (reference), :math:`E\|\hat g\|^2` = 25.11 and
    29.84, cosine of :math:`\hat g` with :math:`\nabla f` 0.251 and 0.250
    (``reference_weights_check`` in ``experiments/ranksgd.py``). Not
    combinable with ``normalize`` (these weights come from no edge set).

  ``update(updates, state, params, *, rank_fn)``: ``rank_fn`` receives the
  stacked candidates (a pytree like ``params`` with a leading axis of
  :math:`m`) and returns candidate indices best-first, at least ``top_k`` of
  them (e.g. ``lambda c: jnp.argsort(jax.vmap(f)(c))``). An invalid ranking
  (repeated or out-of-range indices) gives a NaN estimate, counted in
  ``estimate_info(state).skipped_steps``. ``estimate_info`` counts the
  :math:`m` ranked points per step (:math:`x` included when
  ``include_center``); its ``value`` stays NaN (the objective is never
  observed).

  Ask/tell for oracles outside JAX (a person, a simulator)::

    est = zojax.rank_estimator(8, 3, 0.1)
    state = est.init(params)
    candidates = est.ask(state, params)          # leading axis 8
    ranking = my_oracle(candidates)              # e.g. [5, 0, 2]
    grad, state = est.tell(state, params, candidates, ranking)

  Args:
    num_points: :math:`m` >= 2 candidates per step.
    top_k: :math:`k`, 1 <= k <= m, how many the oracle ranks (``k = m`` for a
      full ranking, ``m = k = 2`` for a pairwise comparison).
    sigma: :math:`\mu` > 0, the perturbation size.
    distribution: ``'gaussian'`` or ``'sphere'``.
    include_center: candidate 0 is ``params`` itself.
    normalize: normalise each edge difference and the estimate.
    weights: ``'graph'`` (the paper) or ``'reference'`` (:math:`m - 2r`).
    mask: coordinates to perturb (see :mod:`zojax.masks`).
    batch_size: directions accumulated at once; ``None`` = all.
    seed: an integer or a PRNG key.

  Returns:
    A :class:`zojax.ZerothOrderTransform` whose ``update`` needs ``rank_fn``.

  References:
    Tang, Rybin & Chang, Zeroth-Order Optimization Meets Human Feedback:
    Provable Learning via Ranking Oracles, ICLR 2024.
  """
  _validate_counts(num_points, top_k)
  num_points, top_k = int(num_points), int(top_k)
  checks.validate_sigma(sigma)
  checks.validate_choice('distribution', distribution, DISTRIBUTIONS)
  checks.validate_choice('weights', weights, WEIGHTS)
  if normalize and weights == 'reference':
    raise ValueError("normalize=True needs weights='graph' (the reference "
                     'weights come from no edge set to normalise).')
  checks.validate_positive_int('batch_size', batch_size, allow_none=True)
  keys.check_seed(seed)
  scale = 1.0 if normalize else 1.0 / probes.num_edges(num_points, top_k)

  def directions_for(step_key, params):
    space = Perturbable.build(params, mask)
    return candidate_directions(step_key, space, num_points, distribution,
                                include_center, scale)

  def init(params):
    check_params(params)
    Perturbable.build(params, mask)
    return EstimatorState(keys.key_data(seed),
                          EstimateStats.create(num_points))

  def ask(state, params):
    step_sigma = checks.value_at(sigma, state.stats.steps)
    return engine.stacked_points(
        directions_for(keys.step_key(state.key), params), step_sigma[None])

  def tell(state, params, points, ranking):
    del points  # regenerated from the state's key
    if not isinstance(ranking, jax.core.Tracer):
      _check_concrete_ranking(np.asarray(ranking), num_points, top_k)
    return estimate(state, params, ranking)

  def estimate(state, params, ranking):
    checks.check_state('rank_estimator', state, EstimatorState, num_points)
    key, step_key = keys.advance(state.key)
    directions = directions_for(step_key, params)
    coefficients, valid = _coefficients(directions, ranking, top_k, weights,
                                        normalize)
    valid = valid & checks.positive(checks.value_at(sigma, state.stats.steps))
    accumulated = engine.coefficient_sum(directions, coefficients, batch_size)
    if normalize:
      accumulated = _unit(accumulated)
    grad = engine.finish_estimate(directions, accumulated, valid)
    return grad, EstimatorState(key, state.stats.record(jnp.nan, valid))

  def update(updates, state, params=None, *positional, rank_fn=None,
             **extra_args):
    del updates, extra_args
    checks.require_update_args('rank_estimator', params, rank_fn, positional,
                               objective='rank_fn')
    candidates = ask(state, params)
    return estimate(state, params,
                    checked_ranking(rank_fn, candidates, top_k))

  return ZerothOrderTransform(init, update, ask, tell)


def candidate_directions(step_key: jax.Array, space: Perturbable,
                         num_points: int, distribution: str,
                         include_center: bool, scale: float):
  r"""The step's :math:`\xi_i`; with ``include_center``, :math:`\xi_0 = 0`
  (candidate 0 is the center; its random draw is discarded, so candidate
  ``i`` has the same direction with and without the center)."""
  drawn = directions_lib.random_directions(step_key, space, num_points,
                                           distribution, scale=scale)
  if not include_center:
    return drawn
  return drawn._replace(
      make=lambda index: (drawn.make(index), index == 0),
      expand=lambda compact: tuple(
          jnp.where(compact[1], 0.0, d) for d in drawn.expand(compact[0])))


def _coefficients(directions, ranking, top_k: int, weights: str,
                  normalize: bool) -> tuple[jax.Array, jax.Array]:
  r"""Each candidate's coefficient :math:`c_i` (:math:`\hat g \propto
  \sum_i c_i \xi_i`) and whether the ranking is valid.

  Graph weights without normalisation are :func:`probes.rank_weights`; the
  reference weights subtract 1 from each ranked item's. Normalised edges:
  with :math:`W_{ij} = [i \succ j] / \|\xi_j - \xi_i\|`, the item's
  coefficient is :math:`\sum_a W_{ai} - \sum_b W_{ib}` (the worse end of
  edges from :math:`a`, the better end of edges to :math:`b`).
  """
  m = directions.count
  graph, valid = probes.rank_weights(ranking, m, top_k)
  if weights == 'reference':
    top = jnp.asarray(ranking)[:top_k].astype(jnp.int32)
    return graph.at[top].add(-1.0, mode='drop'), valid
  if not normalize:
    return graph, valid
  top = jnp.asarray(ranking)[:top_k].astype(jnp.int32)
  position = jnp.full((m,), top_k, jnp.int32).at[top].set(
      jnp.arange(top_k, dtype=jnp.int32), mode='drop')
  edge = (position[:, None] < top_k) & (position[:, None] < position[None])
  distance = _pairwise_distances(directions)
  w = jnp.where(edge & (distance > 0),
                1.0 / jnp.where(distance > 0, distance, 1.0), 0.0)
  return jnp.sum(w, axis=0) - jnp.sum(w, axis=1), valid


def _pairwise_distances(directions) -> jax.Array:
  r""":math:`\|\xi_i - \xi_j\|` for all pairs, from the Gram matrix."""
  stacked = jax.vmap(directions.direction)(
      jnp.arange(directions.count, dtype=jnp.int32))
  gram = sum(jnp.tensordot(d.reshape(d.shape[0], -1),
                           d.reshape(d.shape[0], -1), axes=(1, 1))
             for d in stacked)
  squared = jnp.diag(gram)[:, None] + jnp.diag(gram)[None] - 2.0 * gram
  return jnp.sqrt(jnp.maximum(squared, 0.0))


def _unit(accumulated):
  """The accumulated sum divided by its norm over all leaves (0 stays 0)."""
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in accumulated))
  safe = jnp.where(norm > 0, norm, 1.0)
  return tuple(a / safe for a in accumulated)


def _validate_counts(num_points, top_k):
  checks.validate_positive_int('num_points', num_points)
  checks.validate_positive_int('top_k', top_k)
  if num_points < 2:
    raise ValueError(f'num_points must be >= 2, got {num_points}.')
  if top_k > num_points:
    raise ValueError(f'top_k ({top_k}) must be <= num_points ({num_points}).')


def checked_ranking(rank_fn: RankFn, candidates, top_k: int) -> jax.Array:
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
