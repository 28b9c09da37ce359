"""Transforms that evaluate the objective again after the estimate.

* :func:`conservative_selection`: ZO-Bench's conservative step, the best of
  θ, θ + u and θ − u;
* :func:`rank_line_search`: ZO-RankSGD's line search by ranking, the best of
  x + 2^-j u and x.

They take the incoming update ``u`` and spend evaluations of their own
(counted in ``estimate_info``), so a step of an optimizer that uses one
needs two rounds of queries: its ``update`` runs both, and it has no
single-round ask/tell.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from zojax._src.core import checks
from zojax._src.core.stats import EstimateStats
from zojax._src.estimators.rank import checked_ranking
from zojax._src.query import sharding

EVALS_PER_STEP = 3


class ConservativeState(NamedTuple):
  stats: EstimateStats


def conservative_selection(
    *,
    mesh: Optional[jax.sharding.Mesh] = None,
    data_axis: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rejects an update that does not decrease the objective.

  Given the incoming update :math:`u` (e.g. :math:`-\eta\hat g` from
  ``optax.sgd``), evaluates :math:`L_0 = f(\theta)`,
  :math:`L_1 = f(\theta + u)` and :math:`L_2 = f(\theta - u)` (one ``vmap`` of
  3) and returns, with the rule of ZO-Bench's ``zo_conserv_step``:

  * :math:`u` if :math:`L_1 \le L_0` and :math:`L_1 < L_2`,
  * :math:`0` (stay) if :math:`L_1 > L_0` and :math:`L_0 < L_2`,
  * :math:`-u` otherwise.

  Cost: **3 evaluations per step** beyond those of the estimator. ZO-Bench
  describes the rule as two extra evaluations (the two candidates), but it
  also evaluates :math:`f(\theta)` separately, and so does this transform:
  ``estimate_info`` counts all 3. Non-finite values count as :math:`+\infty`;
  if all three are non-finite the update is zero and the step is counted in
  ``skipped_steps``. Needs the extra argument ``obj_fn`` (and ``batch`` with
  ``obj_fn(params, batch)``, as for :func:`zojax.rge`).

  Args:
    mesh, data_axis: split the batch over this mesh axis (data parallelism,
      as in :func:`zojax.rge`); without them the three evaluations run where
      the step runs.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Zhang et al., Revisiting Zeroth-Order Optimization for Memory-Efficient
    LLM Fine-Tuning: A Benchmark (ZO-Bench), ICML 2024.
  """

  plan = None if data_axis is None else sharding.parallelism(
      mesh, data_axis=data_axis)

  def init_fn(params):
    del params
    return ConservativeState(EstimateStats.create(EVALS_PER_STEP))

  def update_fn(updates, state, params=None, *positional, obj_fn=None,
                batch=None, **extra_args):
    del extra_args
    checks.require_update_args('conservative_selection', params, obj_fn,
                               positional)
    sharding.check_objective(obj_fn, params, batch, plan)
    signs = jnp.asarray([0.0, 1.0, -1.0], jnp.float32)

    def step(local_batch, params, updates):
      objective = sharding.bind_objective(obj_fn, local_batch, plan)

      def value_at(sign):
        candidate = jax.tree.map(
            lambda p, u: (p + sign * u).astype(jnp.result_type(p)), params,
            updates)
        return objective(candidate)

      return jax.vmap(value_at)(signs)

    values = sharding.run(plan, step, batch, params, updates)
    finite = jnp.isfinite(values)
    l0, l1, l2 = jnp.where(finite, values, jnp.inf)
    take_update = (l1 <= l0) & (l1 < l2)
    stay = (l1 > l0) & (l0 < l2)
    factor = jnp.where(take_update, 1.0, jnp.where(stay, 0.0, -1.0))
    any_finite = jnp.any(finite)
    factor = jnp.where(any_finite, factor, 0.0)
    chosen = jnp.where(take_update, l1, jnp.where(stay, l0, l2))
    new_updates = jax.tree.map(
        lambda u: jnp.where(factor == 0, 0, factor * u).astype(u.dtype),
        updates)
    return new_updates, ConservativeState(state.stats.record(chosen,
                                                             any_finite))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
  ``estimate_info``; an invalid ranking keeps :math:`x` (zero update) and
  counts as skipped.

  Args:
    num_steps: :math:`L` >= 1 step sizes tried.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` needing ``rank_fn``.
  """
  checks.validate_positive_int('num_steps', num_steps)
  num_steps = int(num_steps)
  fractions = jnp.concatenate([0.5 ** jnp.arange(num_steps, dtype=jnp.float32),
                               jnp.zeros((1,), jnp.float32)])

  def init_fn(params):
    del params
    return RankLineSearchState(EstimateStats.create(num_steps + 1))

  def update_fn(updates, state, params=None, *positional, rank_fn=None,
                **extra_args):
    del extra_args
    checks.require_update_args('rank_line_search', params, rank_fn,
                               positional, objective='rank_fn')
    candidates = jax.vmap(lambda f: jax.tree.map(
        lambda p, u: (p + f * u).astype(jnp.result_type(p)), params,
        updates))(fractions)
    ranking = checked_ranking(rank_fn, candidates, 1)
    best = ranking[0]
    valid = (best >= 0) & (best <= num_steps)
    factor = jnp.where(valid, fractions[jnp.clip(best, 0, num_steps)], 0.0)
    new_updates = jax.tree.map(
        lambda u: jnp.where(factor == 0, 0, factor * u).astype(u.dtype),
        updates)
    return new_updates, RankLineSearchState(state.stats.record(jnp.nan,
                                                               valid))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
