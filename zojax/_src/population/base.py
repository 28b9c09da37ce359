r"""The shared base of population methods (CBO, Deep GA).

A population method keeps its individuals (particles) in the optimizer
state. Every step evaluates the objective at a set of candidate points and
moves the population; ``update`` returns ``target - params``, the step that
puts ``params`` on the method's current answer (CBO's consensus point, the
GA's best individual). It is an *update*, not a gradient: use the transform
alone or chain it with update transforms (``optax.scale``), not with
``optax.sgd``/``adam``, which would negate it.

A method supplies three pure functions (the evosax pattern of one small
file per algorithm on a shared base):

* ``init(key, params) -> state`` (its own ``NamedTuple`` with ``key`` and
  ``stats`` fields, filled by the base),
* ``candidates(state, params, step_key) -> points`` (leading axis),
* ``advance(state, params, points, values, step_key) -> (target, state,
  value)``.

The base wires them into one :class:`zojax.ZerothOrderTransform`: the points
are evaluated through the query layer (``vmap`` in chunks of ``batch_size``,
split over ``query_axis`` of a mesh), non-finite values are the method's to
rank (worst), and a step in which no value is finite keeps the population,
returns a NaN update (``optax.apply_if_finite`` skips it) and is counted as
skipped. ``ask``/``tell`` expose the same step for objectives outside JAX;
``ask`` appends ``params`` itself as the last point when the method reports
:math:`f(\theta)` (CBO).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from zojax._src.core import checks
from zojax._src.core import keys
from zojax._src.core.base import ZerothOrderTransform
from zojax._src.core.perturbable import check_params
from zojax._src.core.stats import EstimateStats
from zojax._src.estimators.directional import check_values
from zojax._src.query import directions
from zojax._src.query import engine
from zojax._src.query import sharding


class PopulationMethod(NamedTuple):
  """A population method's pieces (see the module docstring).

  Attributes:
    name: for error messages.
    state_type: the method's state class.
    num_candidates: points evaluated per step (static).
    evaluates_params: whether a step also evaluates :math:`f(\\theta)`.
    init: ``(key, params) -> state`` (``key`` and ``stats`` are set by the
      base).
    candidates: ``(state, params, step_key) -> points``.
    advance: ``(state, params, points, values, step_key) -> (target,
      state, value)``.
  """

  name: str
  state_type: type
  num_candidates: int
  evaluates_params: bool
  init: Callable[[jax.Array, Any], Any]
  candidates: Callable[[Any, Any, jax.Array], Any]
  advance: Callable[..., tuple[Any, Any, jax.Array]]

  @property
  def evals_per_step(self) -> int:
    return self.num_candidates + int(self.evaluates_params)


def normal_like(key: jax.Array, tree: Any, count: int) -> Any:
  """N(0, I) draws shaped ``(count,) + leaf.shape`` for every leaf: member
  ``i`` of leaf ``path`` is the generator's direction ``i`` of ``key``
  (:mod:`zojax._src.query.directions`)."""
  def member(index):
    query = directions.query_key(key, index)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: directions.leaf_normal(
            directions.leaf_key(query, jax.tree_util.keystr(
                path, simple=True, separator='/')), jnp.shape(x)), tree)

  return jax.vmap(member)(jnp.arange(count))


def as_float32(tree: Any) -> Any:
  """A float32 copy of ``tree`` (a fresh buffer, never aliasing params)."""
  return jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), tree)


def population_transform(
    method: PopulationMethod,
    *,
    seed,
    batch_size: Optional[int] = None,
    plan: Optional[sharding.Parallelism] = None,
) -> ZerothOrderTransform:
  """The transform of a population method (see the module docstring)."""
  checks.validate_positive_int('batch_size', batch_size, allow_none=True)
  keys.check_seed(seed)
  batch_size = checks.as_int(batch_size)
  if plan is not None and method.num_candidates % plan.query_devices:
    raise ValueError(
        f'{method.num_candidates} points per step do not split evenly over '
        f'the {plan.query_devices} devices of mesh axis '
        f'{plan.query_axis!r}.')

  def init(params):
    check_params(params)
    key, init_key = keys.advance(keys.key_data(seed))
    state = method.init(init_key, params)
    return state._replace(key=key, stats=EstimateStats.create(
        method.evals_per_step))

  def finish(state, params, points, values, param_value):
    checks.check_state(method.name, state, method.state_type,
                       method.evals_per_step)
    key, step_key = keys.advance(state.key)
    target, moved, value = method.advance(state, params, points, values,
                                          step_key)
    if method.evaluates_params:
      value = param_value
    any_finite = jnp.any(jnp.isfinite(values))
    kept = jax.tree.map(lambda new, old: jnp.where(any_finite, new, old),
                        moved, state)
    update = jax.tree.map(
        lambda t, p: (t - p).astype(jnp.result_type(p)), target, params)
    return engine.nan_unless(any_finite, update), kept._replace(
        key=key, stats=state.stats.record(value, any_finite))

  def ask(state, params):
    points = method.candidates(state, params, keys.step_key(state.key))
    if not method.evaluates_params:
      return points
    return jax.tree.map(
        lambda x, p: jnp.concatenate([x, jnp.asarray(p, x.dtype)[None]]),
        points, params)

  def tell(state, params, points, values):
    values = check_values(method.name, points, values,
                          method.evals_per_step)
    count = method.num_candidates
    candidates = jax.tree.map(lambda x: x[:count], points)
    param_value = values[count] if method.evaluates_params else None
    return finish(state, params, candidates, values[:count], param_value)

  def update(updates, state, params=None, *positional, obj_fn=None,
             batch=None, **extra_args):
    del updates, extra_args
    checks.require_update_args(method.name, params, obj_fn, positional)
    sharding.check_objective(obj_fn, params, batch, None)
    objective = sharding.bind_objective(obj_fn, batch, None)
    points = method.candidates(state, params, keys.step_key(state.key))
    values = sharding.replicated(engine.evaluate_points(
        objective, points, batch_size=batch_size, plan=plan), plan)
    param_value = objective(params) if method.evaluates_params else None
    return finish(state, params, points, values, param_value)

  return ZerothOrderTransform(init, update, ask, tell)
