"""The part of a parameter pytree that an estimator perturbs.

A ``mask`` selects the coordinates an estimator may perturb. It is either a
pytree with the structure of ``params`` whose leaves are Python bools or boolean
arrays broadcastable to the leaf's shape, or a callable ``params -> such a
pytree`` (the convention of :func:`optax.masked`; :mod:`zojax.masks` builds
them). A leaf whose mask is the Python bool ``False`` (or a concrete all-False
array) is *statically* frozen: no direction is ever generated for it and its
update is an exact zero. Concrete all-True arrays are simplified to ``True``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

Mask = Any  # pytree of bools / bool arrays, or a callable params -> such a pytree
LeafMask = Any  # True, or a boolean array broadcastable to its leaf


def leaf_paths(params) -> list[str]:
  """'/'-joined key paths of the leaves of ``params``, in flattening order."""
  with_path, _ = jax.tree_util.tree_flatten_with_path(params)
  return [path_to_str(path) for path, _ in with_path]


def path_to_str(path: Sequence[Any]) -> str:
  return jax.tree_util.keystr(tuple(path), simple=True, separator='/')


def check_params(params) -> None:
  """Raises a ValueError unless every leaf of ``params`` is a float array."""
  leaves = jax.tree.leaves(params)
  if not leaves:
    raise ValueError('params is an empty pytree: there is nothing to perturb.')
  for path, leaf in zip(leaf_paths(params), leaves):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
          f'zeroth-order estimators perturb floating-point parameters; leaf '
          f'{path!r} has dtype {dtype}. Keep integer state out of params.')


def flatten_params(params) -> tuple[jax.Array, Callable[[jax.Array], Any]]:
  """``params`` as one float32 vector, and the map back to a pytree with
  ``params``' structure and dtypes (for estimators that work on flat
  vectors: GP surrogates, federated simulations)."""
  check_params(params)
  flat, unravel = ravel_pytree(params)
  dtypes = [x.dtype for x in jax.tree.leaves(params)]

  def unflatten(vector):
    leaves, treedef = jax.tree.flatten(unravel(vector.astype(flat.dtype)))
    return jax.tree.unflatten(
        treedef, [x.astype(t) for x, t in zip(leaves, dtypes)])

  return flat.astype(jnp.float32), unflatten


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _resolve_leaf_mask(path: str, leaf, mask_leaf) -> bool | jax.Array:
  if isinstance(mask_leaf, (bool, np.bool_)):
    return bool(mask_leaf)
  mask_dtype = jnp.result_type(mask_leaf)
  if mask_dtype != jnp.bool_:
    raise ValueError(
        f'mask leaf for {path!r} has dtype {mask_dtype}; masks hold booleans.')
  mask_shape, leaf_shape = jnp.shape(mask_leaf), jnp.shape(leaf)
  try:
    if np.broadcast_shapes(mask_shape, leaf_shape) != tuple(leaf_shape):
      raise ValueError
  except ValueError:
    raise ValueError(
        f'mask leaf for {path!r} has shape {mask_shape}, which does not '
        f'broadcast to the parameter shape {leaf_shape}.') from None
  if _is_concrete(mask_leaf):
    concrete = np.asarray(mask_leaf)
    if concrete.all():
      return True
    if not concrete.any():
      return False
  return jnp.broadcast_to(jnp.asarray(mask_leaf), leaf_shape)


def resolve_mask(mask: Mask, params) -> list[bool | jax.Array]:
  """Per-leaf masks of ``params`` (flattening order): a bool or a bool array."""
  leaves, treedef = jax.tree.flatten(params)
  if mask is None:
    return [True] * len(leaves)
  tree = mask(params) if callable(mask) else mask
  mask_leaves, mask_treedef = jax.tree.flatten(tree)
  if mask_treedef != treedef:
    raise ValueError(
        'mask must have the same pytree structure as params.\n'
        f'  mask:   {mask_treedef}\n  params: {treedef}')
  return [
      _resolve_leaf_mask(path, leaf, m)
      for path, leaf, m in zip(leaf_paths(params), leaves, mask_leaves)
  ]


@dataclasses.dataclass(frozen=True)
class Perturbable:
  """Parameters split into the leaves an estimator perturbs and the rest.

  Directions are tuples with one float32 array per *active* leaf (a leaf not
  statically masked off), in flattening order.

  Attributes:
    leaves: all leaves of ``params``.
    treedef: the structure of ``params``.
    active: indices into ``leaves`` of the perturbed leaves.
    masks: for each active leaf, ``True`` or a boolean array of its shape.
    paths: for each active leaf, its '/'-joined path (what the direction
      generator keys a leaf's entries by).
  """

  leaves: tuple[jax.Array, ...]
  treedef: Any
  active: tuple[int, ...]
  masks: tuple[LeafMask, ...]
  paths: tuple[str, ...]

  @classmethod
  def build(cls, params, mask: Mask = None) -> 'Perturbable':
    leaves, treedef = jax.tree.flatten(params)
    resolved = resolve_mask(mask, params)
    active = tuple(i for i, m in enumerate(resolved) if m is not False)
    if not active:
      raise ValueError('the mask freezes every parameter: nothing to estimate.')
    paths = leaf_paths(params)
    return cls(tuple(leaves), treedef, active,
               tuple(resolved[i] for i in active),
               tuple(paths[i] for i in active))

  @property
  def shapes(self) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(jnp.shape(self.leaves[i])) for i in self.active)

  @property
  def sizes(self) -> tuple[int, ...]:
    return tuple(math.prod(s) for s in self.shapes)

  @property
  def has_elementwise_mask(self) -> bool:
    """Whether some active leaf is only partly perturbed (a bool array)."""
    return any(m is not True for m in self.masks)

  def num_coordinates(self) -> int | jax.Array:
    """Number of perturbed coordinates (an array if a mask is traced)."""
    total = 0
    for size, m in zip(self.sizes, self.masks):
      total = total + (size if m is True else jnp.sum(m, dtype=jnp.int32))
    return total

  def apply_mask(self, direction: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    return tuple(d if m is True else d * m for d, m in zip(direction, self.masks))

  def shifted(self, direction: Sequence[jax.Array], step) -> Any:
    """``params + step * direction`` as a pytree of the original dtypes."""
    leaves = list(self.leaves)
    for i, d in zip(self.active, direction):
      leaf = leaves[i]
      leaves[i] = (leaf + step * d).astype(jnp.result_type(leaf))
    return jax.tree.unflatten(self.treedef, leaves)

  def embed(self, active_values: Sequence[jax.Array]) -> Any:
    """A params-shaped pytree: the given active leaves, zeros elsewhere."""
    # jnp.zeros, not zeros_like: inside shard_map a leaf's mesh sharding
    # must not be copied onto the new array.
    out = [jnp.zeros(jnp.shape(leaf), jnp.result_type(leaf))
           for leaf in self.leaves]
    for i, v in zip(self.active, active_values):
      out[i] = v.astype(jnp.result_type(self.leaves[i]))
    return jax.tree.unflatten(self.treedef, out)

