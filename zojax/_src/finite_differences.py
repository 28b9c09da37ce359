r"""Finite-difference probes and the transform every FD estimator is built on.

For a direction :math:`d_i` and smoothing radius :math:`\sigma`:

* forward: :math:`c_i = (f(\theta + \sigma d_i) - f(\theta)) / \sigma`
  (``q + 1`` evaluations per step),
* central: :math:`c_i = (f(\theta + \sigma d_i) - f(\theta - \sigma d_i)) /
  (2\sigma)` (``2q`` evaluations per step).

The estimate is :math:`s \sum_i c_i d_i` (see :mod:`zojax._src.engine`).
If any objective value of a step is not finite the step's update is exactly
zero and the step is counted in ``estimate_info(state).skipped_steps``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from zojax._src import checks
from zojax._src import engine
from zojax._src import parallel
from zojax._src.base import EstimatorState, ZerothOrderTransform, key_from_seed
from zojax._src.perturbable import Mask, Perturbable, check_params
from zojax._src.stats import EstimateStats

DIFFERENCES = ('forward', 'central')

CoefficientMap = Optional[Callable[[jax.Array], jax.Array]]


def evals_per_step(difference: str, num_directions: int) -> int:
  return num_directions + 1 if difference == 'forward' else 2 * num_directions


def _steps(difference: str, sigma: float) -> jax.Array:
  return jnp.asarray([sigma] if difference == 'forward' else [sigma, -sigma],
                     jnp.float32)


def _coefficient(difference, sigma, values, base, coefficient_map):
  """c_i from the values along d_i (shape (.., 1) forward, (.., 2) central)."""
  if difference == 'forward':
    c = (values[..., 0] - base) / sigma
  else:
    c = (values[..., 0] - values[..., 1]) / (2 * sigma)
  return c if coefficient_map is None else coefficient_map(c)


def estimate(
    objective: Callable[[Any], jax.Array],
    params: Any,
    directions: engine.Directions,
    *,
    sigma: float,
    difference: str,
    batch_size: Optional[int],
    coefficient_map: CoefficientMap = None,
    plan: Optional[parallel.Parallelism] = None,
) -> tuple[Any, jax.Array, jax.Array]:
  """Runs one finite-difference estimate inside the current trace.

  ``objective`` maps params to a float32 scalar (see
  ``parallel.bind_objective``); with a ``plan`` this runs inside
  ``parallel.run``.

  Returns:
    ``(estimate, value, finite)``: the params-shaped estimate, the objective
    value reported by ``estimate_info`` and whether every value was finite.
  """
  space = directions.space
  steps = _steps(difference, sigma)
  base = objective(params) if difference == 'forward' else None

  def probe(index, direction):
    del index
    values = jax.vmap(lambda s: objective(space.shifted(direction, s)))(steps)
    return _coefficient(difference, sigma, values, base,
                        coefficient_map), values

  accumulated, values = engine.weighted_direction_sum(directions, probe,
                                                      batch_size, plan)
  finite = jnp.all(jnp.isfinite(values))
  if base is None:
    value = jnp.mean(values)
  else:
    finite = finite & jnp.isfinite(base)
    value = base
  return engine.finish_estimate(directions, accumulated, finite), value, finite


def ask_points(params, directions: engine.Directions, *, sigma: float,
               difference: str) -> Any:
  """Points for ``ask``: forward ``[θ, θ+σd_0, θ+σd_1, ...]``; central
  ``[θ+σd_0, θ−σd_0, θ+σd_1, θ−σd_1, ...]``."""
  points = engine.stacked_points(directions, _steps(difference, sigma))
  if difference == 'forward':
    points = jax.tree.map(
        lambda p, x: jnp.concatenate([jnp.asarray(p)[None].astype(x.dtype), x]),
        params, points)
  return points


def tell_estimate(values, directions: engine.Directions, *, sigma: float,
                  difference: str, batch_size: Optional[int],
                  coefficient_map: CoefficientMap = None) -> Any:
  """The estimate from values at the points of :func:`ask_points`."""
  values = jnp.asarray(values, jnp.float32)
  expected = evals_per_step(difference, directions.count)
  if values.shape != (expected,):
    raise ValueError(
        f'tell expects {expected} objective values (one per point returned '
        f'by ask), got an array of shape {values.shape}.')
  if difference == 'forward':
    base, along = values[0], values[1:].reshape(-1, 1)
  else:
    base, along = None, values.reshape(-1, 2)
  coefficients = _coefficient(difference, sigma, along, base, coefficient_map)
  accumulated, _ = engine.weighted_direction_sum(
      directions, lambda i, d: (coefficients[i], ()), batch_size)
  finite = jnp.all(jnp.isfinite(values))
  return engine.finish_estimate(directions, accumulated, finite)


def finite_difference_transform(
    name: str,
    *,
    make_directions: Callable[[jax.Array, Perturbable], engine.Directions],
    count_directions: Callable[[Perturbable], int],
    sigma: float,
    difference: str,
    mask: Mask,
    batch_size: Optional[int],
    seed,
    coefficient_map: CoefficientMap = None,
    plan: Optional[parallel.Parallelism] = None,
) -> ZerothOrderTransform:
  """Builds the optax transform (and ask/tell) of a finite-difference estimator.

  Args:
    name: the estimator's name, for error messages.
    make_directions: ``(step_key, space) -> Directions`` of one step.
    count_directions: the (static) number of directions for a ``space``.
    sigma, difference, mask, batch_size, seed: as in :func:`zojax.rge`.
    coefficient_map: optional map applied to each coefficient ``c_i``
      (e.g. ``jnp.sign`` for ZO-signSGD).
    plan: split each step's queries and/or batch over mesh axes (``update``
      only; ``ask``/``tell`` run where they are called).
  """
  checks.validate_sigma(sigma)
  checks.validate_choice('difference', difference, DIFFERENCES)
  checks.validate_positive_int('batch_size', batch_size, allow_none=True)
  initial_key = key_from_seed(seed)

  def directions_for(key, params):
    return make_directions(key, Perturbable.build(params, mask))

  def init_fn(params):
    check_params(params)
    count = count_directions(Perturbable.build(params, mask))
    return EstimatorState(
        key=initial_key,
        stats=EstimateStats.create(evals_per_step(difference, count)))

  def update_fn(updates, state, params=None, *, obj_fn=None, batch=None,
                **extra_args):
    del updates, extra_args  # the estimate replaces any incoming updates
    checks.check_update_args(name, params, obj_fn, batch, plan)
    key, step_key = jax.random.split(state.key)

    def step(local_batch, params, step_key):
      return estimate(
          parallel.bind_objective(obj_fn, local_batch, plan), params,
          directions_for(step_key, params), sigma=sigma,
          difference=difference, batch_size=batch_size,
          coefficient_map=coefficient_map, plan=plan)

    grad, value, finite = parallel.run(plan, step, batch, params, step_key)
    return grad, EstimatorState(key, state.stats.record(value, finite))

  def ask(key, params):
    return ask_points(params, directions_for(key, params), sigma=sigma,
                      difference=difference)

  def tell(key, params, values):
    return tell_estimate(values, directions_for(key, params), sigma=sigma,
                         difference=difference, batch_size=batch_size,
                         coefficient_map=coefficient_map)

  return ZerothOrderTransform(init_fn, update_fn, ask=ask, tell=tell)
