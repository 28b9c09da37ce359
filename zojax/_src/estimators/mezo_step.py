r"""The machinery of MeZO-style optimizers (:func:`zojax.mezo`,
:func:`zojax.qzo`): one step's two-point values, the update written block by
block, and the transform built from a :class:`Config`.

See :mod:`zojax._src.estimators.mezo` for the method and its memory model.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from zojax._src.core import checks
from zojax._src.core import keys
from zojax._src.core.base import ZerothOrderTransform
from zojax._src.core.perturbable import Mask, check_params, leaf_paths
from zojax._src.core.stats import EstimateStats
from zojax._src.estimators.directional import check_values
from zojax._src.estimators.perturbation import LeafSelection, Perturbation
from zojax._src.estimators.perturbation import leaf_selections
from zojax._src.estimators.perturbation import block_elements, block_rows
from zojax._src.estimators.perturbation import map_blocks
from zojax._src.estimators import two_point as two_point_lib
from zojax._src.estimators.two_point import Objective, as_objective
from zojax._src.query import directions
from zojax._src.query import sharding

NO_DECAY = r'(?i)(bias|norm|scale)'


class MeZOState(NamedTuple):
  """State of :func:`mezo`: the PRNG key (split every step), the step count
  (for learning-rate schedules) and the evaluation counters."""

  key: jax.Array
  count: jax.Array
  stats: EstimateStats


class Config(NamedTuple):
  """What :func:`mezo` was built with (static)."""

  learning_rate: Any
  sigma: Any
  num_queries: int
  weight_decay: float
  no_decay: Optional[re.Pattern]
  mask: Mask
  blockwise: Optional[re.Pattern]
  two_point: str = 'fused'
  plan: Optional[sharding.Parallelism] = None
  clip: Any = None
  nonnegative: Optional[re.Pattern] = None
  name: str = 'mezo'

  def selections(self, params, count) -> dict[str, LeafSelection]:
    """Which entries a step perturbs and updates; integer leaves (QZO's
    quantization codes) are always frozen."""
    chosen = leaf_selections(self.mask, self.blockwise, params, count)
    for path, leaf in zip(leaf_paths(params), jax.tree.leaves(params)):
      if jnp.issubdtype(jnp.result_type(leaf), jnp.integer):
        chosen[path] = LeafSelection(False)
    return chosen

  def check_params(self, params) -> None:
    """MeZO trains float leaves; with ``nonnegative`` set (QZO) integer
    leaves (quantization codes) are allowed and stay frozen."""
    if self.nonnegative is None:
      check_params(params)
      return
    for path, leaf in zip(leaf_paths(params), jax.tree.leaves(params)):
      dtype = jnp.result_type(leaf)
      if not (jnp.issubdtype(dtype, jnp.floating)
              or jnp.issubdtype(dtype, jnp.integer)):
        raise ValueError(f'{self.name}: leaf {path!r} has dtype {dtype}.')


def block_size_of(params) -> int:
  return block_elements(sum(math.prod(jnp.shape(x))
                            for x in jax.tree.leaves(params)))


def check_objective(objective: Objective, params, chosen, batch) -> None:
  """Trace-time checks: a real scalar, and every trained leaf perturbed and
  used (else its update would be noise the loss never saw)."""
  used = []

  def trace(p):
    perturbation = Perturbation(keys.key_data(0), 1.0, chosen,
                                block_size_of(p))
    loss = objective.loss(p, perturbation, batch)
    used.append(perturbation.used)
    return loss

  checks.check_scalar_objective(trace, params)
  trained = [p for p, s in chosen.items() if not s.frozen]
  if objective.perturbs_itself:
    missing, verb = [p for p in trained if p not in used[0]], 'perturbed'
  else:
    missing, verb = checks.unused_leaves(trace, params, trained), 'used'
  if missing:
    raise ValueError(
        f'mezo: the objective never {verb} {missing[:5]}: their update would '
        'be noise the loss never saw. Use every trained leaf (or freeze it '
        'with mask=).')


def rewrite(config: Config, params, chosen, step_key, coefficients, lr,
            write: Callable, frozen: Callable) -> Any:
  r"""Every trained leaf rewritten block by block as ``write(values,
  change, new)`` (see :func:`rewrite_leaf`); frozen leaves as
  ``frozen(leaf)``."""
  block_size = block_size_of(params)
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [
      frozen(leaf) if chosen[path].frozen else rewrite_leaf(
          config, path, leaf, chosen[path], step_key, coefficients, lr,
          write, block_size)
      for path, leaf in zip(leaf_paths(params), leaves)])


def rewrite_leaf(config: Config, path: str, leaf, selection, step_key,
                 coefficients, lr, write: Callable, block_size: int,
                 prefix: tuple = (), shape=None) -> jax.Array:
  r"""One trained leaf (or, with ``prefix = (l,)``, layer ``l`` of a stacked
  leaf of ``shape``) rewritten block by block as ``write(values, change,
  new)``: ``change`` = :math:`\eta(\sum_i c_i z_i + \lambda\theta)` on the
  block (each :math:`z_i` regenerated) and ``new`` the projection
  :math:`\max(\theta - \text{change}, 0)` for leaves that must stay
  non-negative (QZO's scales; else None)."""
  shape = jnp.shape(leaf) if shape is None else shape
  dtype = jnp.result_type(leaf)
  decay = config.weight_decay and not (
      config.no_decay and config.no_decay.search(path))
  project = bool(config.nonnegative and config.nonnegative.search(path))

  def noise_sum(prefix, start, size):
    def draw(i):
      key = directions.leaf_key(directions.query_key(step_key, i), path)
      return coefficients[i] * directions.block_normal(
          key, shape, prefix, start, size, jnp.float32)
    if config.num_queries == 1:
      return draw(0)
    return jax.lax.fori_loop(1, config.num_queries,
                             lambda i, total: total + draw(i), draw(0))

  def block(values, prefix, start):
    size = values.shape[0] if values.ndim else None
    direction = noise_sum(prefix, start, size).reshape(values.shape)
    direction = direction.astype(dtype)
    if decay:
      direction = direction + config.weight_decay * values
    change = selection.restrict((lr * direction).astype(dtype), values,
                                prefix, block_rows(values, start))
    new = jnp.maximum(values - change, 0) if project else None
    return write(values, change, new)

  return map_blocks(block, leaf, block_size=block_size, prefix=prefix)


def run_step(config: Config, params, state: MeZOState, objective: Objective,
             batch, values: Optional[tuple[jax.Array, jax.Array]], write,
             frozen):
  """One MeZO step: the two-point values (evaluated here unless given, as
  by ``tell``), then the parameters rewritten. A non-finite projected
  gradient (or a step ``sigma`` <= 0) changes nothing and is counted."""
  checks.check_state(config.name, state, MeZOState, 2 * config.num_queries)
  config.check_params(params)
  chosen = config.selections(params, state.count)
  key, step_key = keys.advance(state.key)
  sigma = checks.value_at(config.sigma, state.count)
  if values is None:
    sharding.check_batch(batch, config.plan)
    check_objective(objective, params, chosen, batch)

    def evaluate(local_batch, params, step_key, sigma):
      return two_point_lib.pair_losses(
          objective, params, step_key, sigma, chosen, block_size_of(params),
          local_batch, num_queries=config.num_queries, mode=config.two_point,
          plan=config.plan)

    values = sharding.run(config.plan, evaluate, batch, params, step_key,
                          sigma)
    # on a mesh with Explicit axes the losses live on the mesh: so must the
    # params they update (replicated; a no-op on Auto axes)
    params = sharding.replicated(params, config.plan)
  loss_plus, loss_minus = values
  projected = (loss_plus - loss_minus) / (2 * sigma)
  finite = jnp.all(jnp.isfinite(projected)) & checks.positive(sigma)
  if config.clip is not None:  # QZO's clipped directional derivative
    clip = checks.value_at(config.clip, state.count)
    projected = jnp.clip(projected, -clip, clip)
  lr = jnp.where(finite, checks.value_at(config.learning_rate, state.count),
                 0.0)
  coefficients = jnp.where(finite, projected, 0.0) / config.num_queries
  new_params = rewrite(config, params, chosen, step_key, coefficients, lr,
                       write, frozen)
  stats = state.stats.record(jnp.mean((loss_plus + loss_minus) / 2), finite)
  # the state keeps one layout from step to step: one compilation
  return new_params, sharding.replicated(
      MeZOState(key, state.count + 1, stats), config.plan)


def ask_points(config: Config, params, state: MeZOState) -> Any:
  """``[θ+εz_0, θ−εz_0, θ+εz_1, ...]``: 2q whole perturbed copies."""
  chosen = config.selections(params, state.count)
  step_key = keys.step_key(state.key)
  sigma = checks.value_at(config.sigma, state.count)

  def pair(index):
    query_key = directions.query_key(step_key, index)
    return jax.vmap(lambda s: Perturbation(
        query_key, s, chosen, block_size_of(params)).tree(params))(
            jnp.stack([sigma, -sigma]))

  points = jax.vmap(pair)(jnp.arange(config.num_queries))
  return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), points)




def validate(learning_rate, sigma, num_queries, two_point, seed, mesh,
             query_axis, data_axis, name) -> Optional[sharding.Parallelism]:
  """The checks shared by :func:`mezo` and :func:`zojax.qzo`; returns the
  mesh plan."""
  checks.validate_sigma(sigma)
  checks.validate_positive_float('learning_rate', learning_rate,
                                 allow_zero=True)
  checks.validate_positive_int('num_queries', num_queries)
  checks.validate_choice('two_point', two_point, two_point_lib.MODES)
  keys.check_seed(seed)
  plan = sharding.parallelism(mesh, query_axis, data_axis)
  if plan is not None and (2 * int(num_queries)) % plan.query_devices:
    raise ValueError(
        f'{name}: the {2 * int(num_queries)} evaluations of a step do not '
        f'split evenly over the {plan.query_devices} devices of mesh axis '
        f'{plan.query_axis!r}.')
  return plan


def write_params(values, change, new):
  return values - change if new is None else new


def _write_update(values, change, new):
  return -change if new is None else (new - values).astype(values.dtype)


def build_transform(config: Config, seed) -> ZerothOrderTransform:
  """init/update/ask/tell/step of a MeZO-style optimizer."""
  evals = 2 * config.num_queries

  def init(params):
    config.check_params(params)
    config.selections(params, 0)  # mask errors when the state is built
    checks.warn_if_sigma_rounds_away(config.sigma, params, config.name)
    return sharding.replicated(MeZOState(
        keys.key_data(seed), jnp.zeros((), jnp.int32),
        EstimateStats.create(evals)), config.plan)

  def step(params, state, *, obj_fn=None, perturbed_fn=None, batch=None):
    return run_step(config, params, state,
                    as_objective(obj_fn, perturbed_fn), batch, None,
                    write=write_params, frozen=lambda leaf: leaf)

  def update(updates, state, params=None, *positional, obj_fn=None,
             perturbed_fn=None, batch=None, **extra_args):
    del updates, extra_args
    checks.require_update_args(config.name, params, obj_fn or perturbed_fn,
                               positional)
    return run_step(config, params, state,
                    as_objective(obj_fn, perturbed_fn), batch, None,
                    write=_write_update, frozen=jnp.zeros_like)

  def ask(state, params):
    return ask_points(config, params, state)

  def tell(state, params, points, values):
    values = check_values(config.name, points, values, evals)
    return run_step(config, params, state, None, None,
                    (values[0::2], values[1::2]), write=_write_update,
                    frozen=jnp.zeros_like)

  return ZerothOrderTransform(init, update, ask, tell, step)
