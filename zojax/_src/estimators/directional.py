r"""The transform every direction-based estimator (RGE, CGE, forward
gradients) is built on.

The estimate is :math:`s\sum_i c_i d_i` (:mod:`zojax._src.query.engine`)
with coefficients from a *probing*: finite differences with radius
:math:`\sigma` (:class:`FiniteDifferences`) or exact directional
derivatives from a JVP (:class:`DirectionalDerivatives`). ``sigma`` is a
float, an optax schedule of the step count, or a traced value. If any value
of a step is not finite (or the step's ``sigma`` is not > 0) the estimate is
NaN and the step is counted in ``estimate_info(state).skipped_steps``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from zojax._src.core import checks
from zojax._src.core import keys
from zojax._src.core.base import EstimatorState, ZerothOrderTransform
from zojax._src.core.perturbable import Mask, Perturbable, check_params
from zojax._src.core.stats import EstimateStats
from zojax._src.query import engine
from zojax._src.query import probes
from zojax._src.query import sharding

DirectionFactory = Callable[[jax.Array, Perturbable], engine.Directions]


class Sums(NamedTuple):
  """What a probing returns: the weighted sum of directions, the value
  reported by ``estimate_info`` and whether every number was finite."""

  accumulated: engine.Direction
  value: jax.Array
  finite: jax.Array


class FiniteDifferences(NamedTuple):
  """Forward or central differences, optionally mapped (``jnp.sign``).

  ``ask`` points: forward ``[θ, θ+σd_0, θ+σd_1, ...]``, central
  ``[θ+σd_0, θ−σd_0, θ+σd_1, θ−σd_1, ...]``. The reported value is
  :math:`f(\\theta)` (forward) or the mean of the values (central).
  """

  difference: str
  coefficient_map: probes.CoefficientMap = None

  def evals(self, count: int) -> int:
    return probes.evals_per_step(self.difference, count)

  def points(self, params, directions, sigma):
    points = engine.stacked_points(directions,
                                   probes.offsets(self.difference, sigma))
    if self.difference == 'central':
      return points
    return jax.tree.map(
        lambda p, x: jnp.concatenate([jnp.asarray(p)[None].astype(x.dtype),
                                      x]), params, points)

  def run(self, objective, params, directions, sigma, batch_size, plan):
    base = objective(params) if self.difference == 'forward' else None
    probe = probes.finite_difference(
        objective, directions.space, difference=self.difference,
        sigma=sigma, base=base, coefficient_map=self.coefficient_map)
    accumulated, values = engine.weighted_direction_sum(
        directions, probe, batch_size, plan)
    return self._sums(accumulated, values, base)

  def from_values(self, values, directions, sigma, batch_size):
    if self.difference == 'forward':
      base, along = values[0], values[1:].reshape(-1, 1)
    else:
      base, along = None, values.reshape(-1, 2)
    coefficients = probes.difference_quotient(
        self.difference, sigma, along, base, self.coefficient_map)
    return self._sums(
        engine.coefficient_sum(directions, coefficients, batch_size),
        along, base)

  def _sums(self, accumulated, values, base):
    finite = jnp.all(jnp.isfinite(values))
    if base is None:
      return Sums(accumulated, jnp.mean(values), finite)
    return Sums(accumulated, base, finite & jnp.isfinite(base))


class DirectionalDerivatives(NamedTuple):
  """Exact :math:`\\nabla f(\\theta)^\\top d_i` from ``jax.jvp``, one
  evaluation each. ``ask`` returns the tangents :math:`d_i` (a pytree like
  ``params`` with a leading axis) and ``tell`` takes the directional
  derivatives along them; the reported value is :math:`f(\\theta)` (NaN
  through ask/tell, where only derivatives are seen)."""

  def evals(self, count: int) -> int:
    return count

  def points(self, params, directions, sigma):
    del params, sigma
    space = directions.space
    return jax.vmap(lambda i: space.embed(directions.direction(i)))(
        jnp.arange(directions.count, dtype=jnp.int32))

  def run(self, objective, params, directions, sigma, batch_size, plan):
    del sigma
    probe = probes.directional_derivative(objective, params, directions.space)
    accumulated, values = engine.weighted_direction_sum(
        directions, probe, batch_size, plan)
    return Sums(accumulated, values[0], jnp.all(jnp.isfinite(values)))

  def from_values(self, values, directions, sigma, batch_size):
    del sigma
    return Sums(engine.coefficient_sum(directions, values, batch_size),
                jnp.float32(jnp.nan), jnp.all(jnp.isfinite(values)))


def direction_transform(
    name: str,
    *,
    make_directions: DirectionFactory,
    count_directions: Callable[[Perturbable], int],
    probing: Any,
    sigma,
    mask: Mask,
    batch_size: Optional[int],
    seed,
    plan: Optional[sharding.Parallelism] = None,
) -> ZerothOrderTransform:
  """Builds the transform (with ask/tell) of a direction-based estimator.

  Args:
    name: the estimator's name, for error messages.
    make_directions: ``(step_key, space) -> Directions`` of one step.
    count_directions: the (static) number of directions for a ``space``.
    probing: :class:`FiniteDifferences` or :class:`DirectionalDerivatives`.
    sigma: the finite-difference radius (``None`` for derivatives).
    mask, batch_size, seed: as in :func:`zojax.rge`.
    plan: split each step's queries and/or batch over mesh axes (``update``
      only; ``ask``/``tell`` run where they are called).
  """
  if sigma is not None:
    checks.validate_sigma(sigma)
  checks.validate_positive_int('batch_size', batch_size, allow_none=True)
  keys.check_seed(seed)
  batch_size = checks.as_int(batch_size)

  def directions_for(step_key, params):
    return make_directions(step_key, Perturbable.build(params, mask))

  def evals(params) -> int:
    return probing.evals(count_directions(Perturbable.build(params, mask)))

  def step_sigma(state):
    return checks.value_at(1.0 if sigma is None else sigma, state.stats.steps)

  def estimate(directions, sums, sigma_now):
    finite = sums.finite & checks.positive(sigma_now)
    return engine.finish_estimate(directions, sums.accumulated, finite)

  def next_state(state, key, sums, sigma_now):
    finite = sums.finite & checks.positive(sigma_now)
    return EstimatorState(key, state.stats.record(sums.value, finite))

  def init(params):
    check_params(params)
    if sigma is not None:
      checks.warn_if_sigma_rounds_away(sigma, params, name)
    return EstimatorState(keys.key_data(seed),
                          EstimateStats.create(evals(params)))

  def update(updates, state, params=None, *positional, obj_fn=None,
             batch=None, **extra_args):
    del updates, extra_args  # the estimate replaces any incoming updates
    checks.require_update_args(name, params, obj_fn, positional)
    checks.check_state(name, state, EstimatorState, evals(params))
    sharding.check_objective(obj_fn, params, batch, plan)
    key, step_key = keys.advance(state.key)
    sigma_now = step_sigma(state)

    def step(local_batch, params, step_key, sigma_now):
      objective = sharding.bind_objective(obj_fn, local_batch, plan)
      directions = directions_for(step_key, params)
      sums = probing.run(objective, params, directions, sigma_now,
                         batch_size, plan)
      return estimate(directions, sums, sigma_now), sums

    grad, sums = sharding.run(plan, step, batch, params, step_key, sigma_now)
    # the state keeps one layout from step to step: one compilation
    return grad, sharding.replicated(next_state(state, key, sums, sigma_now),
                                     plan)

  def ask(state, params):
    directions = directions_for(keys.step_key(state.key), params)
    return probing.points(params, directions, step_sigma(state))

  def tell(state, params, points, values):
    checks.check_state(name, state, EstimatorState, evals(params))
    key, step_key = keys.advance(state.key)
    directions = directions_for(step_key, params)
    values = check_values(name, points, values,
                          probing.evals(directions.count))
    sigma_now = step_sigma(state)
    sums = probing.from_values(values, directions, sigma_now, batch_size)
    return (estimate(directions, sums, sigma_now),
            next_state(state, key, sums, sigma_now))

  return ZerothOrderTransform(init, update, ask, tell)


def check_values(name: str, points, values, expected: int) -> jax.Array:
  """``values`` as a float32 vector of one value per asked point."""
  values = jnp.asarray(values, jnp.float32)
  if values.shape != (expected,):
    raise ValueError(
        f'{name}: tell expects {expected} values (one per point returned by '
        f'ask), got an array of shape {values.shape}.')
  leaves = jax.tree.leaves(points)
  if leaves and jnp.shape(leaves[0])[:1] != (expected,):
    raise ValueError(
        f'{name}: tell expects the {expected} points returned by ask, got '
        f'points with leading axis {jnp.shape(leaves[0])[:1]}.')
  return values
