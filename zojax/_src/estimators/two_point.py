r"""The two-point queries of MeZO-style steps: :math:`L(\theta \pm \epsilon
z_i)` for every query :math:`i`, at the memory of inference.

A step's :math:`2q` evaluations are *units* :math:`u = 2i + s`: query
:math:`i`, sign :math:`s` (0 for :math:`+\epsilon`, 1 for :math:`-\epsilon`).
:func:`pair_losses` evaluates them

* *fused* (default): the two signs of a query in one pass, a ``vmap`` over
  :math:`\pm\epsilon` whose perturbations share one draw of :math:`z_i` per
  block (the noise does not depend on the sign, so it is computed once); two
  perturbed copies of one layer and two sets of activations are alive;
* *sequential*: the two signs one after the other (the second forward
  waits for the first value), one perturbed layer and one set of
  activations alive, :math:`z_i` drawn for each sign;
* split over a device mesh (DistZO2's perturbation and data parallelism):
  each device of ``query_axis`` takes an equal share of the units (whole
  queries when they divide evenly, so it can still fuse), each device of
  ``data_axis`` evaluates its shard of the batch and the losses are averaged
  (``pmean``); only the :math:`2q` scalars cross devices.

Queries run one after the other either way, so memory does not grow with
:math:`q`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from zojax._src.estimators.perturbation import Perturbation
from zojax._src.query import directions
from zojax._src.query import sharding

MODES = ('fused', 'sequential')


class Objective(NamedTuple):
  """``loss(params, perturbation, batch)``; ``perturbs_itself``: whether it
  perturbs its parameters part by part (``perturbed_fn``) or is evaluated at
  ``perturbation.tree(params)`` (``obj_fn``)."""

  loss: Callable[[Any, Perturbation, Any], jax.Array]
  perturbs_itself: bool


def as_objective(obj_fn, perturbed_fn) -> Objective:
  """The objective from ``update``/``step``'s keyword arguments."""
  if (obj_fn is None) == (perturbed_fn is None):
    raise ValueError('pass exactly one of obj_fn=f(params) or '
                     'perturbed_fn=f(params, perturbation) to update/step.')
  if perturbed_fn is not None:
    return Objective(
        lambda p, q, batch: (perturbed_fn(p, q) if batch is None else
                             perturbed_fn(p, q, batch)), True)
  return Objective(
      lambda p, q, batch: (obj_fn(q.tree(p)) if batch is None else
                           obj_fn(q.tree(p), batch)), False)


def pair_losses(objective: Objective, params, step_key, sigma, chosen,
                block_size: int, batch: Any, *, num_queries: int, mode: str,
                plan: Optional[sharding.Parallelism]):
  r"""``(L_plus, L_minus)``, each of shape ``(q,)`` (float32). Runs inside
  ``sharding.run`` when ``plan`` splits the work (``batch`` is then this
  device's shard)."""

  def loss(query, scale):
    perturbation = Perturbation(directions.query_key(step_key, query), scale,
                                chosen, block_size)
    value = jnp.asarray(objective.loss(params, perturbation, batch),
                        jnp.float32)
    if plan is not None and plan.data_axis is not None:
      value = jax.lax.pmean(value, plan.data_axis)
    return value

  units = sharding.local_query_indices(2 * num_queries, plan)
  signs = jnp.stack([sigma, -sigma]).astype(jnp.float32)
  if units.shape[0] % 2 == 0:  # whole queries on this device
    queries = units[::2] // 2
    if mode == 'fused':  # the pair shares one draw
      pair = lambda query: jax.vmap(lambda s: loss(query, s))(signs)
    else:
      pair = lambda query: _one_after_the_other(loss, query, sigma)
    values = _sequentially(pair, queries).reshape(-1)
  else:
    values = _sequentially(lambda u: loss(u // 2, signs[u % 2]), units)
  if plan is not None and plan.query_axis is not None:
    values = jax.lax.all_gather(values, plan.query_axis, tiled=True)
  return values[0::2], values[1::2]


def _one_after_the_other(loss, query, sigma) -> jax.Array:
  """``[L(+sigma), L(-sigma)]`` of one query, the second forward starting
  after the first ends: its scale depends on the first value (``0 * L+``
  is not folded away, it is NaN for a NaN ``L+``), so the two sets of
  activations are never alive together (an ``optimization_barrier`` does
  not survive XLA's CPU pipeline)."""
  plus = loss(query, sigma)
  minus = loss(query, -sigma + 0.0 * plus)
  return jnp.stack([plus, minus])


def _sequentially(fn, indices):
  """``fn`` at each index, one after the other (``lax.map``)."""
  if indices.shape[0] == 1:
    return fn(indices[0])[None]
  return jax.lax.map(fn, indices)
