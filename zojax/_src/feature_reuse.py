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
  (:mod:`zojax._src.difference`), whose rounding is relative to
  :math:`\Delta h`, so those forwards may use tensor-core precision.

The estimate is plain CGE's (:func:`zojax.cge` with the same mask), up to rounding:
forward :math:`\hat g_j = (f(\theta + \sigma e_j) - f(\theta)) / \sigma`,
central :math:`(f(\theta + \sigma e_j) - f(\theta - \sigma e_j)) / 2\sigma`,
zero off the mask; only the cost of evaluating it changes.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zojax._src import checks
from zojax._src import parallel
from zojax._src.base import EstimatorState, ZerothOrderTransform
from zojax._src.difference import PRECISIONS, OneHot, propagate
from zojax._src.finite_differences import DIFFERENCES, evals_per_step
from zojax._src.perturbable import Mask, check_params, resolve_mask
from zojax._src.stats import EstimateStats

Stage = Callable[[Any, Any], Any]


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
  2.6 s per step by default, 7.0 s subtracting in float32, both with
  cosine 0.9999 to the true gradient; subtracting in TF32 takes 2.3 s but
  its cosine falls to 0.96-0.98.

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
    batch_size: queries of one leaf evaluated at once (``vmap`` width);
      ``None``: all of them.
    difference_precision: ``'default'``, ``'highest'`` or ``'bfloat16'``:
      each query propagates its change of the activations through the
      layers above (``zojax._src.difference``: linear and bilinear
      operations act on the change, everything else is evaluated at the
      changed and unchanged values and subtracted), with the matmuls and
      convolutions on changes at the backend's default precision, float32,
      or bfloat16 operands with float32 accumulation. ``None``: each query
      evaluates the perturbed objective and subtracts the unperturbed value.
      The estimate is the same up to rounding in every case.
    mesh, query_axis, data_axis: split each leaf's coordinates and/or the
      batch over mesh axes, as in :func:`zojax.cge`.

  Returns:
    A :class:`zojax.ZerothOrderTransform` (without ask/tell: the stages are
    the objective).

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
  plan = parallel.parallelism(mesh, query_axis, data_axis)
  steps = [sigma] if difference == 'forward' else [sigma, -sigma]

  def layout(params) -> _Layout:
    if not isinstance(params, (tuple, list)) or len(params) != len(stages):
      raise ValueError(
          f'feature_reuse_cge: params must be a tuple with one pytree per '
          f'stage ({len(stages)}), got {type(params).__name__}'
          + (f' of length {len(params)}.' if isinstance(params, (tuple, list))
             else '.'))
    check_params(params)
    return _Layout.build(params, mask)

  def init_fn(params):
    count = layout(params).num_coordinates
    return EstimatorState(key=jax.random.PRNGKey(0),
                          stats=EstimateStats.create(
                              evals_per_step(difference, count)))

  def objective_value(value):
    value = jnp.asarray(value, jnp.float32)
    if plan is not None and plan.data_axis is not None:
      value = jax.lax.pmean(value, plan.data_axis)
    return value

  def update_fn(updates, state, params=None, *, batch=None, mask=None,
                **extra_args):
    del updates, extra_args
    if params is None:
      raise ValueError('feature_reuse_cge: params must be passed to update().')
    parallel.check_batch(batch, plan)
    info = layout(params)
    _check_scalar_loss(stages, loss, inputs, params, batch)
    coordinates = info.coordinates(params, mask)
    if plan is not None and plan.query_axis is not None:
      coordinates = tuple(
          _padded(c, leaf.size, plan.query_devices)
          for c, leaf in zip(coordinates, info.leaves))

    def step(batch, params, coordinates):
      hidden = [inputs(batch)]
      for stage, stage_params in zip(stages, params):
        hidden.append(stage(stage_params, hidden[-1]))
      local_base = jnp.asarray(loss(hidden[-1], batch), jnp.float32)
      base = objective_value(local_base)
      estimates, totals = [], []
      for leaf, coords in zip(info.leaves, coordinates):
        local = _local_share(coords, leaf.size, plan)
        changes = _leaf_changes(stages, loss, params, hidden, batch,
                                local_base, leaf, local, steps, batch_size,
                                difference_precision)
        # per-query pmean over the data axis (the mean of the changes is the
        # change of the mean)
        changes = objective_value(changes)
        values = base + changes
        valid = local < leaf.size
        if difference == 'forward':
          c = changes[:, 0] / sigma
        else:
          c = (changes[:, 0] - changes[:, 1]) / (2 * sigma)
        c = jnp.where(valid, c, 0.0)
        flat = jnp.zeros(leaf.size, jnp.float32).at[local].add(c, mode='drop')
        estimates.append(flat.reshape(leaf.shape))
        totals.append(jnp.stack([
            jnp.sum(jnp.where(valid[:, None], values, 0.0)),
            jnp.sum(valid & ~jnp.all(jnp.isfinite(values), axis=1))]))
      if plan is not None and plan.query_axis is not None:
        estimates, totals = jax.lax.psum((estimates, totals), plan.query_axis)
      total_value, num_nonfinite = jnp.sum(jnp.stack(totals), axis=0)
      finite = (num_nonfinite == 0) & jnp.isfinite(base)
      if difference == 'forward':
        value = base
      else:
        value = total_value / (2 * info.num_coordinates)
      return estimates, value, finite

    estimates, value, finite = parallel.run(plan, step, batch, tuple(params),
                                            coordinates)
    grad = info.embed(params, estimates, finite)
    return grad, EstimatorState(state.key, state.stats.record(value, finite))

  return ZerothOrderTransform(init_fn, update_fn)


class _Leaf:
  """A perturbed leaf: its stage, its index in the stage, shape and size."""

  def __init__(self, stage: int, index: int, shape: tuple[int, ...],
               count: int):
    self.stage, self.index, self.shape, self.count = stage, index, shape, count
    self.size = int(np.prod(shape, dtype=np.int64))


class _Layout:
  """Which leaves of which stages are perturbed, and how many coordinates."""

  def __init__(self, leaves: list[_Leaf], base_masks: list[Any]):
    self.leaves = leaves
    self.base_masks = base_masks
    self.num_coordinates = sum(leaf.count for leaf in leaves)

  @classmethod
  def build(cls, params, mask: Mask) -> '_Layout':
    resolved = resolve_mask(mask, tuple(params))
    leaves, base_masks = [], []
    for (stage, index, leaf), m in zip(_stage_leaves(params), resolved):
      if m is False:
        continue
      if isinstance(m, jax.core.Tracer):
        raise ValueError(
            'feature_reuse_cge perturbs every masked-in coordinate, so the '
            'construction mask must be concrete (not computed from traced '
            'values); compute it once outside jit.')
      count = int(np.size(leaf)) if m is True else int(np.asarray(m).sum())
      leaves.append(_Leaf(stage, index, tuple(np.shape(leaf)), count))
      base_masks.append(m)
    if not leaves:
      raise ValueError('the mask freezes every parameter: nothing to estimate.')
    return cls(leaves, base_masks)

  def coordinates(self, params, override: Mask) -> tuple[jax.Array, ...]:
    """Flat indices of the perturbed coordinates of each leaf (int32)."""
    if override is None:
      return tuple(
          jnp.arange(leaf.size, dtype=jnp.int32) if m is True else
          jnp.asarray(np.flatnonzero(np.asarray(m)), jnp.int32)
          for leaf, m in zip(self.leaves, self.base_masks))
    resolved = resolve_mask(override, tuple(params))
    by_position = {(stage, index): m for (stage, index, _), m in
                   zip(_stage_leaves(params), resolved)}
    out = []
    for leaf in self.leaves:
      m = by_position[(leaf.stage, leaf.index)]
      if m is True or m is False:
        m = jnp.full(leaf.shape, m)
      count = (None if isinstance(m, jax.core.Tracer)
               else int(np.asarray(m).sum()))
      if count is not None and count != leaf.count:
        raise ValueError(
            f'the update mask selects {count} coordinates of leaf '
            f'{leaf.index} of stage {leaf.stage}; the construction mask '
            f'selected {leaf.count}, and the count must stay the same.')
      out.append(jnp.nonzero(jnp.ravel(m), size=leaf.count,
                             fill_value=leaf.size)[0].astype(jnp.int32))
    return tuple(out)

  def embed(self, params, estimates, finite) -> Any:
    """The estimate as a pytree like ``params`` (zeros where not perturbed)."""
    by_position = {(leaf.stage, leaf.index): e
                   for leaf, e in zip(self.leaves, estimates)}
    out = []
    for stage, stage_params in enumerate(params):
      leaves, treedef = jax.tree.flatten(stage_params)
      new = []
      for index, leaf in enumerate(leaves):
        e = by_position.get((stage, index))
        e = jnp.zeros(jnp.shape(leaf)) if e is None else jnp.where(finite, e,
                                                                   0.0)
        new.append(e.astype(jnp.result_type(leaf)))
      out.append(jax.tree.unflatten(treedef, new))
    return type(params)(out)


def _stage_leaves(params) -> list[tuple[int, int, Any]]:
  """``(stage, index in the stage, leaf)`` of every leaf of the stage params,
  in the flattening order of the tuple."""
  return [(stage, index, leaf) for stage, stage_params in enumerate(params)
          for index, leaf in enumerate(jax.tree.leaves(stage_params))]


def _leaf_changes(stages, loss, params, hidden, batch, base, leaf: _Leaf,
                  coordinates: jax.Array, steps, batch_size,
                  difference_precision) -> jax.Array:
  """Objective changes ``f(θ + s e_j) - f(θ)``, shape ``(len(coordinates),
  len(steps))``, of one leaf's queries, each from the cached input of the
  leaf's stage: the perturbed value minus ``base`` (= f(θ) on this device's
  batch), or with ``difference_precision`` the change propagated by
  :func:`zojax._src.difference.propagate`."""
  stage_leaves, treedef = jax.tree.flatten(params[leaf.stage])
  original = stage_leaves[leaf.index]
  step_sizes = jnp.asarray(steps, jnp.float32)

  def objective(leaf_value):
    leaves = list(stage_leaves)
    leaves[leaf.index] = leaf_value
    h = stages[leaf.stage](jax.tree.unflatten(treedef, leaves),
                           hidden[leaf.stage])
    for stage in range(leaf.stage + 1, len(stages)):
      h = stages[stage](params[stage], h)
    return jnp.asarray(loss(h, batch), jnp.float32)

  step_value = lambda s: s.astype(original.dtype)
  if difference_precision is None:

    def change(coordinate, step_size):
      perturbed = jnp.ravel(original).at[coordinate].add(
          step_value(step_size), mode='drop').reshape(leaf.shape)
      return objective(perturbed) - base
  else:

    def change(coordinate, step_size):
      delta = OneHot(coordinate, step_value(step_size), leaf.shape,
                     original.dtype)
      return propagate(objective, (original,), (delta,),
                       difference_precision)[1]

  def changes_at(coordinate):
    return jax.vmap(lambda s: change(coordinate, s))(step_sizes)

  if batch_size is None:
    return jax.vmap(changes_at)(coordinates)
  return jax.lax.map(changes_at, coordinates, batch_size=batch_size)


def _padded(coordinates: jax.Array, size: int, devices: int) -> jax.Array:
  """Pads with the no-op index ``size`` to a multiple of ``devices``."""
  extra = -coordinates.shape[0] % devices
  return jnp.concatenate([coordinates,
                          jnp.full((extra,), size, jnp.int32)])


def _local_share(coordinates: jax.Array, size: int,
                 plan: Optional[parallel.Parallelism]) -> jax.Array:
  """This device's contiguous block of a leaf's coordinates."""
  if plan is None or plan.query_axis is None:
    return coordinates
  per_device = coordinates.shape[0] // plan.query_devices
  first = jax.lax.axis_index(plan.query_axis) * per_device
  return jax.lax.dynamic_slice_in_dim(coordinates, first, per_device)


def apply_stages(stages: Sequence[Stage], params: Sequence[Any],
                 x: Any) -> Any:
  """The model's output: the stages applied in order."""
  for stage, stage_params in zip(stages, params):
    x = stage(stage_params, x)
  return x


def _check_scalar_loss(stages, loss, inputs, params, batch) -> None:
  checks.check_scalar_objective(
      lambda p: loss(apply_stages(stages, p, inputs(batch)), batch),
      tuple(params))
