"""ZO-Bench's conservative step: keep the best of θ, θ + u and θ − u."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from zojax._src import checks
from zojax._src import parallel
from zojax._src.stats import EstimateStats

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

  plan = None if data_axis is None else parallel.parallelism(
      mesh, data_axis=data_axis)

  def init_fn(params):
    del params
    return ConservativeState(EstimateStats.create(EVALS_PER_STEP))

  def update_fn(updates, state, params=None, *, obj_fn=None, batch=None,
                **extra_args):
    del extra_args
    checks.check_update_args('conservative_selection', params, obj_fn, batch,
                             plan)
    signs = jnp.asarray([0.0, 1.0, -1.0], jnp.float32)

    def step(local_batch, params, updates):
      objective = parallel.bind_objective(obj_fn, local_batch, plan)

      def value_at(sign):
        candidate = jax.tree.map(
            lambda p, u: (p + sign * u).astype(jnp.result_type(p)), params,
            updates)
        return objective(candidate)

      return jax.vmap(value_at)(signs)

    values = parallel.run(plan, step, batch, params, updates)
    finite = jnp.isfinite(values)
    l0, l1, l2 = jnp.where(finite, values, jnp.inf)
    take_update = (l1 <= l0) & (l1 < l2)
    stay = (l1 > l0) & (l0 < l2)
    factor = jnp.where(take_update, 1.0, jnp.where(stay, 0.0, -1.0))
    any_finite = jnp.any(finite)
    factor = jnp.where(any_finite, factor, 0.0)
    chosen = jnp.where(take_update, l1, jnp.where(stay, l0, l2))
    new_updates = jax.tree.map(lambda u: (factor * u).astype(u.dtype), updates)
    return new_updates, ConservativeState(state.stats.record(chosen,
                                                             any_finite))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
