r"""Forward gradients: the exact directional derivative from a JVP."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from zojax._src import checks
from zojax._src import directions as directions_lib
from zojax._src import engine
from zojax._src import parallel
from zojax._src.base import EstimatorState, ZerothOrderTransform, key_from_seed
from zojax._src.perturbable import Mask, Perturbable, check_params
from zojax._src.rge import random_directions
from zojax._src.stats import EstimateStats


def forward_gradient(
    num_queries: int = 1,
    *,
    distribution: str = 'gaussian',
    mask: Mask = None,
    batch_size: Optional[int] = None,
    seed=0,
    mesh: Optional[jax.sharding.Mesh] = None,
    query_axis: Optional[str] = None,
    data_axis: Optional[str] = None,
) -> ZerothOrderTransform:
  r"""Forward-gradient estimator (the backprop-free first-order baseline).

  .. math::
    \hat g = \frac{1}{q} \sum_{i=1}^{q} (\nabla f(\theta)^\top v_i)\, v_i,
    \qquad v_i \sim N(0, I),

  where :math:`\nabla f(\theta)^\top v_i` is computed *exactly* by one
  forward-mode pass (``jax.jvp``), with no finite-difference error. It is
  unbiased for :math:`\nabla f(\theta)`. Each JVP is counted as one
  evaluation in ``estimate_info`` (it costs about 2-3 forward passes of
  compute and no activation storage). Unlike the other estimators it needs a
  differentiable ``obj_fn``.

  Args:
    num_queries: directions per step.
    distribution: ``'gaussian'`` (default, as in Baydin et al.),
      ``'rademacher'`` or ``'sphere'`` (scaled by d, as in :func:`zojax.rge`).
    mask: coordinates to perturb (see :mod:`zojax.masks`).
    batch_size: JVPs evaluated at once; ``None`` = all.
    seed: int seed or PRNG key.
    mesh, query_axis, data_axis: split each step's JVPs and/or the batch over
      mesh axes, as in :func:`zojax.rge`.

  Returns:
    A :class:`zojax.ZerothOrderTransform` needing ``obj_fn`` (no ask/tell:
    a JVP needs the objective inside JAX).

  References:
    Baydin et al., Gradients without Backpropagation, 2022; Zhang et al.,
    ZO-Bench, ICML 2024.
  """
  checks.validate_positive_int('num_queries', num_queries)
  checks.validate_choice('distribution', distribution,
                         directions_lib.DISTRIBUTIONS)
  checks.validate_positive_int('batch_size', batch_size, allow_none=True)
  initial_key = key_from_seed(seed)
  plan = parallel.parallelism(mesh, query_axis, data_axis)

  def init_fn(params):
    check_params(params)
    Perturbable.build(params, mask)
    return EstimatorState(initial_key, EstimateStats.create(num_queries))

  def update_fn(updates, state, params=None, *, obj_fn=None, batch=None,
                **extra_args):
    del updates, extra_args
    checks.check_update_args('forward_gradient', params, obj_fn, batch, plan)
    key, step_key = jax.random.split(state.key)

    def step(local_batch, params, step_key):
      objective = parallel.bind_objective(obj_fn, local_batch, plan)
      space = Perturbable.build(params, mask)
      directions = random_directions(step_key, space, num_queries,
                                     distribution)

      def probe(index, direction):
        del index
        value, derivative = jax.jvp(objective, (params,),
                                    (space.embed(direction),))
        return derivative, value

      accumulated, values = engine.weighted_direction_sum(
          directions, probe, batch_size, plan)
      finite = jnp.all(jnp.isfinite(values))
      grad = engine.finish_estimate(directions, accumulated, finite)
      return grad, values[0], finite

    grad, value, finite = parallel.run(plan, step, batch, params, step_key)
    return grad, EstimatorState(key, state.stats.record(value, finite))

  return ZerothOrderTransform(init_fn, update_fn)
