r"""Probes: the scalar :math:`c_i` that weighs direction :math:`d_i`.

* finite differences with radius :math:`\sigma`: forward
  :math:`c_i = (f(\theta + \sigma d_i) - f(\theta)) / \sigma` (``q + 1``
  evaluations per step), central :math:`c_i = (f(\theta + \sigma d_i) -
  f(\theta - \sigma d_i)) / 2\sigma` (``2q``); optionally mapped
  (``jnp.sign`` for ZO-SignSGD);
* the exact directional derivative :math:`\nabla f(\theta)^\top d_i` of a
  JVP (forward gradients);
* rank weights: the weight of each candidate in ZO-RankSGD's comparison
  graph, from a ranking alone.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from zojax._src.core.perturbable import Perturbable

DIFFERENCES = ('forward', 'central')
CoefficientMap = Optional[Callable[[jax.Array], jax.Array]]


def evals_per_step(difference: str, num_directions: int) -> int:
  """Objective evaluations of one finite-difference step."""
  return num_directions + 1 if difference == 'forward' else 2 * num_directions


def offsets(difference: str, sigma) -> jax.Array:
  """The steps along a direction: ``[sigma]`` or ``[sigma, -sigma]``."""
  sigma = jnp.asarray(sigma, jnp.float32)
  return sigma[None] if difference == 'forward' else jnp.stack([sigma,
                                                                -sigma])


def difference_quotient(difference: str, sigma, along: jax.Array, base,
                        coefficient_map: CoefficientMap = None) -> jax.Array:
  """:math:`c_i` from the values along :math:`d_i` (last axis: 1 value
  forward, 2 central) and, forward, the base value :math:`f(\\theta)`."""
  if difference == 'forward':
    c = (along[..., 0] - base) / sigma
  else:
    c = (along[..., 0] - along[..., 1]) / (2 * sigma)
  return c if coefficient_map is None else coefficient_map(c)


def finite_difference(objective: Callable[[Any], jax.Array],
                      space: Perturbable, *, difference: str, sigma,
                      base=None, coefficient_map: CoefficientMap = None):
  """The probe ``(index, direction) -> (c_i, values along d_i)``."""
  steps = offsets(difference, sigma)

  def probe(index, direction):
    del index
    values = jax.vmap(lambda s: objective(space.shifted(direction, s)))(steps)
    return difference_quotient(difference, sigma, values, base,
                               coefficient_map), values

  return probe


def directional_derivative(objective: Callable[[Any], jax.Array], params,
                           space: Perturbable):
  """The probe ``(index, direction) -> (grad f . d_i, f(theta))`` (JVP)."""

  def probe(index, direction):
    del index
    value, derivative = jax.jvp(objective, (params,),
                                (space.embed(direction),))
    return derivative, value

  return probe


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
  ranked = 2.0 * jnp.arange(top_k, dtype=jnp.float32) + 1.0 - num_points
  weights = jnp.full((num_points,), float(top_k), jnp.float32)
  weights = weights.at[top].set(ranked, mode='drop')
  in_range = jnp.all((top >= 0) & (top < num_points))
  counts = jnp.zeros((num_points,), jnp.int32).at[top].add(1, mode='drop')
  return weights, in_range & jnp.all(counts <= 1)


def num_edges(num_points: int, top_k: int) -> int:
  """:math:`|E| = k(k-1)/2 + k(m-k)`."""
  return top_k * (top_k - 1) // 2 + top_k * (num_points - top_k)
