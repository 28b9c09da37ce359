"""Models given as stages: which leaves of which stage a coordinate-wise
estimator perturbs, and how their coordinates are shared out.

A model is a sequence of stages ``h_l = stage_l(params_l, h_{l-1})`` with
``params`` a tuple of per-stage pytrees (:func:`zojax.flax.module_stages`
builds one from Flax modules).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zojax._src.core.perturbable import Mask, resolve_mask
from zojax._src.query import sharding

Stage = Callable[[Any, Any], Any]


class Leaf:
  """A perturbed leaf: its stage, its index in the stage, shape and size."""

  def __init__(self, stage: int, index: int, shape: tuple[int, ...],
               count: int):
    self.stage, self.index, self.shape, self.count = stage, index, shape, count
    self.size = int(np.prod(shape, dtype=np.int64))


class Layout:
  """Which leaves of which stages are perturbed, and how many coordinates."""

  def __init__(self, leaves: list[Leaf], base_masks: list[Any]):
    self.leaves = leaves
    self.base_masks = base_masks
    self.num_coordinates = sum(leaf.count for leaf in leaves)

  @classmethod
  def build(cls, params, mask: Mask) -> 'Layout':
    resolved = resolve_mask(mask, tuple(params))
    leaves, base_masks = [], []
    for (stage, index, leaf), m in zip(stage_leaves(params), resolved):
      if m is False:
        continue
      if isinstance(m, jax.core.Tracer):
        raise ValueError(
            'feature_reuse_cge perturbs every masked-in coordinate, so the '
            'construction mask must be concrete (not computed from traced '
            'values); compute it once outside jit.')
      count = int(np.size(leaf)) if m is True else int(np.asarray(m).sum())
      leaves.append(Leaf(stage, index, tuple(np.shape(leaf)), count))
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
                   zip(stage_leaves(params), resolved)}
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
                                                                   jnp.nan)
        new.append(e.astype(jnp.result_type(leaf)))
      out.append(jax.tree.unflatten(treedef, new))
    return type(params)(out)


def stage_leaves(params) -> list[tuple[int, int, Any]]:
  """``(stage, index in the stage, leaf)`` of every leaf of the stage params,
  in the flattening order of the tuple."""
  return [(stage, index, leaf) for stage, stage_params in enumerate(params)
          for index, leaf in enumerate(jax.tree.leaves(stage_params))]


def padded(coordinates: jax.Array, size: int, devices: int) -> jax.Array:
  """Pads with the no-op index ``size`` to a multiple of ``devices``."""
  extra = -coordinates.shape[0] % devices
  return jnp.concatenate([coordinates,
                          jnp.full((extra,), size, jnp.int32)])


def local_share(coordinates: jax.Array, size: int,
                 plan: Optional[sharding.Parallelism]) -> jax.Array:
  """This device's contiguous block of a leaf's coordinates."""
  if plan is None or plan.query_axis is None:
    return coordinates
  per_device = coordinates.shape[0] // plan.query_devices
  first = jax.lax.axis_index(plan.query_axis) * per_device
  return jax.lax.dynamic_slice_in_dim(coordinates, first, per_device)


def chunk_layout(counts: Sequence[int], batch_size: Optional[int]
                 ) -> tuple[int, np.ndarray, list]:
  """Equal chunks of a stage's queries (its leaves' queries concatenated).

  ``ceil(total / batch_size)`` chunks (one if ``batch_size`` is None) of
  ``width = ceil(total / chunks)`` queries each, the last padded (pads belong
  to the last leaf). Returns ``(width, kinds, compositions)``: chunk ``c``
  holds the segments ``compositions[kinds[c]]``, ``(leaf position, length)``
  in order; chunks of the same composition share one kind.
  """
  total = int(sum(counts))
  if total == 0:
    return 0, np.zeros(0, np.int32), []
  num_chunks = 1 if batch_size is None else -(-total // batch_size)
  width = -(-total // num_chunks)
  owners = np.repeat(np.arange(len(counts)), counts)
  owners = np.concatenate(
      [owners, np.full(num_chunks * width - total, len(counts) - 1)])
  kinds_of: dict[tuple, int] = {}
  kinds = []
  for chunk in owners.reshape(num_chunks, width):
    composition = tuple((int(position), len(list(group)))
                        for position, group in itertools.groupby(chunk))
    kinds.append(kinds_of.setdefault(composition, len(kinds_of)))
  return width, np.asarray(kinds, np.int32), list(kinds_of)


def apply_stages(stages: Sequence[Stage], params: Sequence[Any],
                 x: Any) -> Any:
  """The model's output: the stages applied in order."""
  for stage, stage_params in zip(stages, params):
    x = stage(stage_params, x)
  return x
