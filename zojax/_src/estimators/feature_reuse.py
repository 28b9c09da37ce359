r"""Coordinate-wise estimation with feature reuse, for models given as stages.

DeepZero (Chen et al., ICLR 2024) observes that perturbing one coordinate of
layer :math:`l` leaves the activations of the layers below it unchanged. For
a model written as a sequence of stages

.. math::
  h_0 = x, \qquad h_l = s_l(\theta_l, h_{l-1}), \qquad
  f(\theta) = \mathrm{loss}(h_L, \mathrm{batch}),

the query :math:`f(\theta + \sigma e_j)` for a coordinate :math:`j` of
:math:`\theta_l` only needs :math:`s_l, \dots, s_L` evaluated from the cached
:math:`h_{l-1}`. zojax goes one step further than DeepZero's per-layer cache:

* the queries of one parameter leaf are ``vmap``-ed with *only that leaf*
  batched. Everything of stage :math:`l` that does not depend on the leaf
  (e.g. the first convolution of a residual block when the second one's
  kernel is perturbed) is computed once per chunk, not once per query;
* the perturbed leaf's layer sees a shared input and per-query weights, which
  XLA evaluates as one wide layer (the ``K`` weight copies stacked on the
  output features) rather than ``K`` grouped ones;
* every layer above it runs with *shared* weights on the stacked
  ``(queries x batch)`` activations: one large batched forward;
* by default what travels up is the *change* of the activations
  :math:`\Delta h = h(\theta + \sigma e_j) - h(\theta)`
  (:mod:`zojax._src.estimators.difference`), whose rounding is relative to
  :math:`\Delta h`, so those forwards may use tensor-core precision. The
  unperturbed forward pass is recorded once per step (every intermediate
  value kept); the queries only repeat the operations on changes;
* a stage's queries (all its leaves') share one loop whose body holds the
  stages above once: the compiled program grows with the number of stages
  times the depth, not with the number of leaves times the depth.

The estimate is plain CGE's (:func:`zojax.cge` with the same mask), up to rounding:
forward :math:`\hat g_j = (f(\theta + \sigma e_j) - f(\theta)) / \sigma`,
central :math:`(f(\theta + \sigma e_j) - f(\theta - \sigma e_j)) / 2\sigma`,
zero off the mask; only the cost of evaluating it changes.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zojax._src.core import checks
from zojax._src.core import keys
from zojax._src.core.base import EstimatorState, ZerothOrderTransform
from zojax._src.core.perturbable import Mask, check_params
from zojax._src.core.stats import EstimateStats
from zojax._src.estimators import stages as stages_lib
from zojax._src.estimators.cge import cge
from zojax._src.estimators import difference
from zojax._src.estimators.difference import PRECISIONS, OneHot
from zojax._src.estimators.stages import Stage, apply_stages
from zojax._src.query import sharding
from zojax._src.query.probes import DIFFERENCES, evals_per_step


def feature_reuse_cge(
    stages: Sequence[Stage],
    loss: Callable[[Any, Any], jax.Array],
    sigma: float,
    *,
    mask: Mask = None,
    inputs: Callable[[Any], Any] = operator.itemgetter(0),
    difference: str = 'forward',
    batch_size: Optional[int] = None,
    difference_precision: Optional[str] = 'default',
    seed=0,
    mesh: Optional[jax.sharding.Mesh] = None,
    query_axis: Optional[str] = None,
    data_axis: Optional[str] = None,
) -> ZerothOrderTransform:
  r"""Full coordinate-wise gradient estimate (CGE) with feature reuse.

  The objective is the composition of the stages (see the module docstring):
  :math:`f(\theta; \mathrm{batch}) = \mathrm{loss}(s_L(\theta_L, \dots
  s_1(\theta_1, x)), \mathrm{batch})` with :math:`x` = ``inputs(batch)``.
  ``params`` is a tuple (or list) with one pytree per stage. Every coordinate
  selected by ``mask`` is perturbed every step, as ``zojax.cge(sigma,
  mask=mask)`` with ``num_coords=None`` does, and the estimate is the same
  (up to float rounding: the same values are computed with differently
  batched kernels); a step costs the same ``n + 1`` (forward) or ``2n``
  (central) objective evaluations, each evaluated from the cached input of
  the perturbed stage (see the module docstring for what is shared).

  Precision: by default each query propagates the *change* its coordinate
  causes through the layers above (``difference_precision``), so rounding is
  relative to the change rather than to the activations, and the matmuls and
  convolutions on changes run at the backend's default precision (TF32 on
  recent NVIDIA GPUs). Evaluating the perturbed objective and subtracting
  (``difference_precision=None``) is as exact only in full float32: on GPUs
  trace it under ``jax.default_matmul_precision('highest')``, since TF32
  rounding swamps forward differences at small ``sigma``. On one H100,
  ResNet-20, 28,217 coordinates, batch 256 (``experiments/bench_deepzero.py``):
  2.4 s per step by default with cosine 0.9999 to the true gradient. An
  earlier version (one program body per leaf) took 7.0 s subtracting in
  float32 (cosine 0.9999) and 2.3 s subtracting in TF32 (cosine 0.96-0.98).

  Memory: a step holds one chunk's ``(queries x batch)`` activations and,
  propagating changes, the recorded forward pass (every intermediate value
  of one forward on the batch, about what backpropagation keeps).

  ``update(updates, state, params, *, batch, mask=None)``: ``batch`` is the
  data of the step (``None`` if the stages need none); ``mask`` optionally
  replaces the construction mask for this step (e.g. DeepZero's masks
  re-drawn on a schedule with :func:`zojax.sparsity.random_mask`). It may be
  traced, but it must keep the construction mask's number of coordinates in
  every leaf (checked when concrete), which is what keeps it to one
  compilation. ``updates`` is ignored.

  Args:
    stages: functions ``stage(stage_params, h) -> h`` applied in order
      (e.g. :func:`zojax.flax.module_stages` of Flax modules).
    loss: ``loss(h_L, batch) -> scalar`` on the last stage's output.
    sigma: finite-difference step (> 0).
    mask: the coordinates perturbed (see :mod:`zojax.masks`), for the tuple
      of stage params; it must be concrete (its counts fix the queries).
    inputs: ``batch -> h_0``; default ``batch[0]`` (``batch = (x, y)``).
    difference: ``'forward'`` or ``'central'``.
    batch_size: queries evaluated at once (``vmap`` width): each stage's
      queries (its leaves' concatenated) run in equal chunks of at most
      ``batch_size``; ``None``: each stage's queries at once.
    difference_precision: ``'default'``, ``'highest'`` or ``'bfloat16'``:
      each query propagates its change of the activations through the
      layers above (``zojax._src.estimators.difference``: linear and bilinear
      operations act on the change, everything else is evaluated at the
      changed and unchanged values and subtracted), with the matmuls and
      convolutions on changes at the backend's default precision, float32,
      or bfloat16 operands with float32 accumulation. ``None``: each query
      evaluates the perturbed objective and subtracts the unperturbed value.
      The estimate is the same up to rounding in every case.
    seed: an integer or a PRNG key (kept and split every step like every
      zojax state; full CGE draws nothing from it).
    mesh, query_axis, data_axis: split each leaf's coordinates and/or the
      batch over mesh axes, as in :func:`zojax.cge`.

  Ask/tell: the points and the estimate of ``zojax.cge(sigma, mask=mask,
  difference=difference)`` (the same estimate, computed from values the
  caller evaluates; feature reuse is how ``update`` evaluates them). A
  non-finite value makes the estimate NaN, as for :func:`zojax.cge`.

  Returns:
    A :class:`zojax.ZerothOrderTransform`.

  References:
    Chen et al., DeepZero: Scaling up Zeroth-Order Optimization for Deep
    Model Training, ICLR 2024 (sparsity-induced CGE with feature reuse).
  """
  stages = tuple(stages)
  if not stages or not all(callable(s) for s in stages):
    raise ValueError('stages must be a non-empty sequence of functions '
                     '(stage_params, h) -> h.')
  checks.validate_sigma(sigma)
  checks.validate_choice('difference', difference, DIFFERENCES)
  checks.validate_positive_int('batch_size', batch_size, allow_none=True)
  if difference_precision is not None:
    checks.validate_choice('difference_precision', difference_precision,
                           PRECISIONS)
  keys.check_seed(seed)
  plan = sharding.parallelism(mesh, query_axis, data_axis)
  plain = cge(sigma, mask=mask, difference=difference, batch_size=batch_size,
              seed=seed)

  def layout(params) -> stages_lib.Layout:
    if not isinstance(params, (tuple, list)) or len(params) != len(stages):
      raise ValueError(
          f'feature_reuse_cge: params must be a tuple with one pytree per '
          f'stage ({len(stages)}), got {type(params).__name__}'
          + (f' of length {len(params)}.' if isinstance(params, (tuple, list))
             else '.'))
    check_params(params)
    return stages_lib.Layout.build(params, mask)

  def evals(params) -> int:
    return evals_per_step(difference, layout(params).num_coordinates)

  def init_fn(params):
    return EstimatorState(key=keys.key_data(seed),
                          stats=EstimateStats.create(evals(params)))

  config = _Config(tuple(stages), loss, inputs, sigma, difference,
                   checks.as_int(batch_size), difference_precision, plan)

  def update_fn(updates, state, params=None, *positional, batch=None,
                mask=None, **extra_args):
    del updates, extra_args
    if positional:
      raise TypeError('feature_reuse_cge: call update(None, state, params, '
                      'batch=..., mask=...) (the objective is the stages).')
    if params is None:
      raise ValueError('feature_reuse_cge: params must be passed to update().')
    checks.check_state('feature_reuse_cge', state, EstimatorState,
                       evals(params))
    sharding.check_batch(batch, plan)
    info = layout(params)
    checks.check_scalar_objective(
        lambda p: loss(apply_stages(stages, p, inputs(batch)), batch),
        tuple(params))
    coordinates = info.coordinates(params, mask)
    if plan is not None and plan.query_axis is not None:
      coordinates = tuple(
          stages_lib.padded(c, leaf.size, plan.query_devices)
          for c, leaf in zip(coordinates, info.leaves))
    estimates, value, finite = sharding.run(
        plan, lambda *args: _estimate(config, info, *args), batch,
        tuple(params), coordinates)
    grad = info.embed(params, estimates, finite)
    key, _ = keys.advance(state.key)
    return grad, EstimatorState(key, state.stats.record(value, finite))

  return ZerothOrderTransform(init_fn, update_fn, plain.ask, plain.tell)


class _Config(NamedTuple):
  """What :func:`feature_reuse_cge` was built with (static)."""

  stages: tuple
  loss: Callable[[Any, Any], jax.Array]
  inputs: Callable[[Any], Any]
  sigma: float
  difference: str
  batch_size: Optional[int]
  difference_precision: Optional[str]
  plan: Optional[sharding.Parallelism]

  def objective_value(self, value):
    """A local value averaged over the data axis (the mean of the changes
    is the change of the mean)."""
    value = jnp.asarray(value, jnp.float32)
    if self.plan is not None and self.plan.data_axis is not None:
      value = jax.lax.pmean(value, self.plan.data_axis)
    return value


def _estimate(config: _Config, info, batch, params, coordinates):
  """One device's step: the forward pass (recorded when changes are
  propagated), then every stage's queries from its cached input. Returns
  ``(estimates, value, finite)``."""
  model = _Forward(config, params, batch)
  base = config.objective_value(model.value)
  local = [stages_lib.local_share(coords, leaf.size, config.plan)
           for leaf, coords in zip(info.leaves, coordinates)]
  leaf_changes = []
  for stage in sorted({leaf.stage for leaf in info.leaves}):
    positions = [j for j, leaf in enumerate(info.leaves)
                 if leaf.stage == stage]
    leaf_changes += _stage_changes(
        config, model, stage, [info.leaves[j] for j in positions],
        [local[j] for j in positions])
  estimates, totals = [], []
  for leaf, coords, local_changes in zip(info.leaves, local, leaf_changes):
    changes = config.objective_value(local_changes)
    values = base + changes
    valid = coords < leaf.size
    if config.difference == 'forward':
      c = changes[:, 0] / config.sigma
    else:
      c = (changes[:, 0] - changes[:, 1]) / (2 * config.sigma)
    c = jnp.where(valid, c, 0.0)
    flat = jnp.zeros(leaf.size, jnp.float32).at[coords].add(c, mode='drop')
    estimates.append(flat.reshape(leaf.shape))
    totals.append(jnp.stack([
        jnp.sum(jnp.where(valid[:, None], values, 0.0)),
        jnp.sum(valid & ~jnp.all(jnp.isfinite(values), axis=1))]))
  if config.plan is not None and config.plan.query_axis is not None:
    estimates, totals = jax.lax.psum((estimates, totals),
                                     config.plan.query_axis)
  total_value, num_nonfinite = jnp.sum(jnp.stack(totals), axis=0)
  finite = (num_nonfinite == 0) & jnp.isfinite(base)
  if config.difference == 'forward':
    return estimates, base, finite
  return estimates, total_value / (2 * info.num_coordinates), finite


class _Forward:
  """The unperturbed forward pass on this device's batch: each stage's input
  ``hidden[l]`` and the loss ``value``; with ``difference_precision``, each
  stage and the loss as a :class:`~zojax._src.estimators.difference.Recording`
  (every intermediate value kept), so that the queries only repeat the
  operations on changes."""

  def __init__(self, config: _Config, params, batch):
    self.config, self.params = config, params
    self.hidden = [config.inputs(batch)]
    self.recordings = []
    self.loss = lambda h: jnp.asarray(config.loss(h, batch), jnp.float32)
    if config.difference_precision is None:
      for stage, stage_params in zip(config.stages, params):
        self.hidden.append(stage(stage_params, self.hidden[-1]))
      self.value = self.loss(self.hidden[-1])
      return
    for stage, stage_params in zip(config.stages, params):
      self.recordings.append(
          difference.Recording(stage, (stage_params, self.hidden[-1])))
      self.hidden.append(self.recordings[-1].value)
    self.recorded_loss = difference.Recording(self.loss, (self.hidden[-1],))
    self.value = self.recorded_loss.value

  def output(self, stage: int, stage_params):
    """Stage ``stage``'s output from its cached input, with ``stage_params``."""
    return self.config.stages[stage](stage_params, self.hidden[stage])

  def value_above(self, stage: int, h) -> jax.Array:
    """The loss from stage ``stage``'s output ``h``."""
    return self.loss(apply_stages(self.config.stages[stage + 1:],
                                  self.params[stage + 1:], h))

  def change_of_output(self, stage: int, index: int, delta):
    """The change of stage ``stage``'s output when its flat parameter leaf
    ``index`` changes by ``delta``."""
    recording = self.recordings[stage]
    deltas = [None] * recording.num_inputs
    deltas[index] = delta
    return difference.changes(recording, deltas,
                              self.config.difference_precision)

  def change_above(self, stage: int, change) -> jax.Array:
    """The loss's change when stage ``stage``'s output changes by ``change``."""
    precision = self.config.difference_precision
    for later in range(stage + 1, len(self.config.stages)):
      recording = self.recordings[later]
      num_params = recording.num_inputs - len(jax.tree.leaves(change))
      change = difference.changes(
          recording, [None] * num_params + jax.tree.leaves(change), precision)
    return difference.changes(self.recorded_loss, jax.tree.leaves(change),
                              precision)


def _stage_changes(config: _Config, model: _Forward, stage: int,
                   leaves: list, coordinates: list) -> list:
  """Objective changes ``f(θ + s e_j) - f(θ)`` of the queries of one stage's
  leaves, one ``(len(coordinates[i]), len(steps))`` array per leaf.

  A query has two parts: its *entry*, the stage's output with the coordinate
  perturbed, from the stage's cached input (with ``difference_precision``:
  the change of that output, propagated from the recorded stage), and its
  *finish*, the stages above and the loss applied to the entry, minus f(θ)
  on this device's batch (or the change propagated through them). The
  stage's queries (all its leaves', concatenated) are evaluated in equal
  chunks of at most ``batch_size``
  (:func:`zojax._src.estimators.stages.chunk_layout`): a chunk's entries come
  from the ``lax.switch`` branch of its composition (which leaves, how many
  queries of each), its finish from one body shared by the whole stage, so
  the program holds the stages above once per stage rather than once per
  leaf.
  """
  stage_leaves, treedef = jax.tree.flatten(model.params[stage])
  steps = jnp.asarray(
      [config.sigma] if config.difference == 'forward' else
      [config.sigma, -config.sigma], jnp.float32)

  if config.difference_precision is None:

    def entry(leaf, coordinate, step):
      original = stage_leaves[leaf.index]
      values = list(stage_leaves)
      values[leaf.index] = jnp.ravel(original).at[coordinate].add(
          step.astype(original.dtype), mode='drop').reshape(leaf.shape)
      return model.output(stage, jax.tree.unflatten(treedef, values))

    def finish(output):
      return model.value_above(stage, output) - model.value
  else:

    def entry(leaf, coordinate, step):
      original = stage_leaves[leaf.index]
      return model.change_of_output(stage, leaf.index, OneHot(
          coordinate, step.astype(original.dtype), leaf.shape,
          original.dtype))

    def finish(change):
      return model.change_above(stage, change)

  counts = [int(c.shape[0]) for c in coordinates]
  width, kinds, compositions = stages_lib.chunk_layout(counts,
                                                       config.batch_size)
  if width == 0:
    return [jnp.zeros((0, steps.shape[0]), jnp.float32) for _ in leaves]

  def entries_of(composition):
    def entries(chunk):
      parts, start = [], 0
      for position, length in composition:
        leaf = leaves[position]
        parts.append(jax.vmap(lambda c, leaf=leaf: jax.vmap(
            lambda s: entry(leaf, c, s))(steps))(chunk[start:start + length]))
        start += length
      return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
    return entries

  branches = [entries_of(c) for c in compositions]
  finish_chunk = jax.vmap(jax.vmap(finish))

  def chunk_changes(kind, chunk):  # (one branch: switch calls it directly)
    return finish_chunk(jax.lax.switch(kind, branches, chunk))

  pad = kinds.size * width - sum(counts)
  chunks = jnp.concatenate(
      list(coordinates) + [jnp.full((pad,), leaves[-1].size, jnp.int32)]
  ).reshape(kinds.size, width)
  if kinds.size == 1:
    changes = chunk_changes(0, chunks[0])
  else:
    changes = jax.lax.map(lambda args: chunk_changes(*args),
                          (jnp.asarray(kinds), chunks))
  changes = changes.reshape(-1, steps.shape[0])
  offsets = np.cumsum([0] + counts)
  return [changes[start:stop] for start, stop in zip(offsets[:-1],
                                                     offsets[1:])]
