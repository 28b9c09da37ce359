r"""Perturbations drawn block by block, for methods at the memory of inference.

MeZO's memory saving rests on never storing the direction :math:`z`: it is
drawn again from the step's key whenever it is needed. The draws come from
the one generator of :mod:`zojax._src.query.directions` (an entry is a pure
function of the step key, the query index, the leaf's path and the entry's
position), which draws any block of a leaf without the rest. This module
holds the pieces that use it block by block:

* :func:`map_blocks` rewrites an array block by block (a ``fori_loop`` of
  ``dynamic_update_slice``), so a donated buffer is rewritten in place and
  only one block's temporaries are alive;
* :class:`LeafSelection` says which entries of a leaf are perturbed and
  updated (all, none, a boolean mask, a magnitude threshold per layer, a
  block of block-wise ZO), evaluated block by block;
* :class:`Perturbation` is what an objective receives to perturb its own
  parameters part by part (a subtree, one layer of a stack inside a
  ``lax.scan``, the rows of an embedding lookup, a tied output layer).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from zojax._src.core.masks import MagnitudeThresholds
from zojax._src.core.perturbable import leaf_paths, resolve_mask
from zojax._src.query import directions

# Entries per block of ``map_blocks``: at most BLOCK_ELEMENTS (the block's
# draw has a few 32-bit temporaries per entry: tens of MiB), at least
# MIN_BLOCK_ELEMENTS, else 1/256 of the model, so the temporaries stay a small
# fraction of any model while blocks stay large enough for the loop overhead
# not to matter on a GPU (H100, 1.07B params: 81 ms per MeZO step with 2**20
# entries per block, 54 ms with 2**22, same memory).
BLOCK_ELEMENTS = 1 << 22
MIN_BLOCK_ELEMENTS = 1 << 14

Index = Sequence[Any]  # leading indices fixed so far (ints or int scalars)


def block_elements(num_params: int) -> int:
  """Entries per block for a model of ``num_params`` parameters."""
  return int(min(BLOCK_ELEMENTS, max(MIN_BLOCK_ELEMENTS, num_params // 256)))


def leaf_noise(key: jax.Array, path: str, leaf: jax.Array) -> jax.Array:
  """The noise of a whole leaf for query key ``key`` (tests, small models)."""
  return directions.leaf_normal(directions.leaf_key(key, path),
                                jnp.shape(leaf), jnp.result_type(leaf))


def map_blocks(fn: Callable[[jax.Array, tuple, Any], jax.Array],
               array: jax.Array, *, block_size: int, prefix: Index = (),
               axis: int = 0, row_size: Optional[int] = None) -> jax.Array:
  """``fn(block, prefix, start)`` over blocks of ``array``, written back.

  The array is rewritten by a ``fori_loop`` of ``dynamic_update_slice`` over
  blocks of indices along ``axis`` (``start`` is a block's first index) of
  about ``block_size`` entries; an index larger than that (a whole layer of
  a stacked leaf) is itself split, with its index appended to ``prefix``.
  Every block is sliced from and written back to ``array`` itself (never
  through a copy of the layer it belongs to), so when ``array`` is a donated
  buffer or a loop carry it is rewritten in place, and only one block's
  temporaries are alive at a time.

  Args:
    fn: maps a block to an array of the same shape and dtype.
    array: the array to rewrite.
    block_size: entries per block (see :func:`block_elements`).
    prefix: leading indices already fixed, passed on to ``fn``.
    axis: the axis split into blocks (0, or the last axis for the columns of
      a matmul's output, with ``row_size`` the size of a column's table row).
    row_size: parameter entries per index of ``axis`` (default: ``array``'s).
  """
  prefix = tuple(prefix)
  if array.ndim == 0:
    return fn(array, prefix, 0)
  if axis == 0 and row_size is None:
    return _map_row_blocks(fn, array, (), block_size, prefix)
  num_rows = array.shape[axis]
  if row_size is None:
    row_size = array.size // max(num_rows, 1)
  block = max(1, min(num_rows, block_size // max(row_size, 1)))
  num_blocks, remainder = divmod(num_rows, block)
  if num_blocks == 1 and not remainder:
    return fn(array, prefix, 0)

  def rewrite(start, size, values):
    current = jax.lax.dynamic_slice_in_dim(values, start, size, axis)
    return jax.lax.dynamic_update_slice_in_dim(
        values, fn(current, prefix, start), start, axis)

  return _each_block(rewrite, array, num_rows, block)


def _map_row_blocks(fn, array: jax.Array, fixed: tuple, block_size: int,
                    prefix: tuple) -> jax.Array:
  """:func:`map_blocks` along axis 0 of ``array[fixed]`` (``fixed``: the
  indices of the leading axes, a layer being split), each block sliced from
  and written back to the whole ``array``."""
  shape = array.shape[len(fixed):]
  num_rows, row_size = shape[0], math.prod(shape[1:])
  if row_size > block_size and len(shape) >= 2:  # split each index too
    return jax.lax.fori_loop(
        0, num_rows, lambda i, a: _map_row_blocks(
            fn, a, fixed + (i,), block_size, prefix + (i,)), array)
  block = max(1, min(num_rows, block_size // max(row_size, 1)))
  num_blocks, remainder = divmod(num_rows, block)
  if not fixed and num_blocks == 1 and not remainder:
    return fn(array, prefix, 0)

  def rewrite(start, size, values):
    starts = fixed + (start,) + (0,) * (len(shape) - 1)
    sizes = (1,) * len(fixed) + (size,) + shape[1:]
    current = jax.lax.dynamic_slice(values, starts, sizes)
    new = fn(current.reshape(sizes[len(fixed):]), prefix, start)
    return jax.lax.dynamic_update_slice(values, new.reshape(sizes), starts)

  return _each_block(rewrite, array, num_rows, block)


def _each_block(rewrite: Callable, array: jax.Array, num_rows: int,
                block: int) -> jax.Array:
  """``rewrite(start, size, array)`` for the blocks of ``block`` indices of
  ``num_rows`` (a ``fori_loop`` over the full blocks, then the remainder)."""
  num_blocks, remainder = divmod(num_rows, block)
  if num_blocks == 1:
    array = rewrite(0, block, array)
  elif num_blocks > 1:
    array = jax.lax.fori_loop(
        0, num_blocks, lambda i, v: rewrite(i * block, block, v), array)
  if remainder:
    array = rewrite(num_blocks * block, remainder, array)
  return array


class LeafSelection:
  """Which entries of one leaf are perturbed and updated.

  One of: all (``True``), none (``False``), a boolean array of the leaf's
  shape, or a magnitude threshold ``|θ| <= h`` (Sparse MeZO) with ``h`` a
  scalar or one value per index of the leading axis. The threshold form needs
  no stored mask: it is evaluated on the parameters at hand, block by block.
  Block-wise ZO adds ``block = (active, block_id)``: only the entries of the
  active block are selected, ``block_id`` being the leaf's block (an int) or
  ``'leading'`` (each index of the leading axis, a stacked layer, is a
  block).
  """

  def __init__(self, selected: Any = True,
               threshold: Optional[jax.Array] = None,
               block: Optional[tuple[Any, Any]] = None):
    self.selected = selected
    self.threshold = threshold
    self.block = block

  @property
  def frozen(self) -> bool:
    return self.selected is False and self.threshold is None

  def mask(self, values: jax.Array, prefix: Index,
           rows: Optional[jax.Array]) -> Optional[jax.Array]:
    """The mask of ``values`` = ``leaf[(*prefix, rows)]``; None = all."""
    mask = self._entries(values, prefix, rows)
    if self.block is None:
      return mask
    active, block_id = self.block
    if block_id == 'leading':
      index = prefix[0] if prefix else rows
      in_block = jnp.reshape(index, jnp.shape(index) + (1,) * (
          values.ndim - jnp.ndim(index))) == active
    else:
      in_block = jnp.asarray(block_id) == active
    in_block = jnp.broadcast_to(in_block, values.shape)
    return in_block if mask is None else jnp.logical_and(mask, in_block)

  def restrict(self, x: jax.Array, values: jax.Array, prefix: Index,
               rows: Optional[jax.Array]) -> jax.Array:
    """``x`` (shaped like ``values``) zeroed outside the mask of ``values``."""
    mask = self.mask(values, prefix, rows)
    return x if mask is None else jnp.where(mask, x, jnp.zeros((), x.dtype))

  def _entries(self, values, prefix, rows):
    if self.threshold is not None:
      h = self.threshold
      if jnp.ndim(h) and prefix:  # one threshold per leading index
        h = h[prefix[0]]
      elif jnp.ndim(h) and rows is not None:
        h = jnp.take(h, rows, axis=0)
      if jnp.ndim(h):
        h = jnp.reshape(h, jnp.shape(h) + (1,) * (values.ndim - jnp.ndim(h)))
      return jnp.abs(values) <= h.astype(values.dtype)
    if self.selected is True:
      return None
    selected = self.selected
    for i in prefix:
      selected = selected[i]
    return selected if rows is None else jnp.take(selected, rows, axis=0)


def block_rows(values: jax.Array, start) -> Optional[jax.Array]:
  """The indices ``start + arange(n)`` of a block's leading axis."""
  if values.ndim == 0:
    return None
  return jnp.asarray(start) + jnp.arange(values.shape[0])


class Perturbation:
  r"""The perturbation :math:`\theta + s z` of one evaluation, drawn on demand.

  Objectives that take a ``perturbation`` argument (``zojax.mezo``'s
  ``perturbed_fn``, :class:`zojax.models.Decoder`) perturb each part of the
  params right before using it, so that XLA holds the perturbed copy of one
  part at a time instead of the whole model:

  * :meth:`tree` — a subtree (small leaves, or a model without stacking);
  * :meth:`layer` — one slice of stacked layers, inside the ``lax.scan``;
  * :meth:`rows` — an embedding lookup, perturbing only the rows looked up;
  * :meth:`matmul_transposed` — a tied output layer ``x @ (E + s z).T``,
    without a perturbed copy of ``E``.

  ``path`` arguments are the '/'-joined paths of those parts in the params
  the optimizer sees. The object records (at trace time) which paths were
  perturbed, so the optimizer can check that the objective perturbed every
  trained leaf. It is a trace-time helper, not a pytree: use it inside the
  function that receives it.
  """

  def __init__(self, key: jax.Array, scale,
               selections: dict[str, LeafSelection], block_size: int):
    self.key = key  # the query key: fold_in(step key, query index)
    self.scale = scale
    self.selections = selections
    self.block_size = block_size
    self.used: set[str] = set()

  def _selection(self, path: str) -> LeafSelection:
    selection = self.selections.get(path)
    if selection is None:
      raise ValueError(
          f'the objective perturbed {path!r}, which is not a leaf of the '
          f'params being optimized (leaves: {sorted(self.selections)[:8]}...). '
          'Pass paths relative to the params given to the optimizer.')
    self.used.add(path)
    return selection

  def _scaled(self, path, selection, values, noise, prefix, rows):
    step = jnp.asarray(self.scale, values.dtype) * noise.astype(values.dtype)
    return selection.restrict(step, values, prefix, rows)

  def _shift(self, path: str, value: jax.Array, prefix: Index) -> jax.Array:
    """``value + s z`` for ``value`` = ``leaf[prefix]`` (prefix: () or a
    layer index)."""
    selection = self._selection(path)
    if selection.frozen:
      return value
    key = directions.leaf_key(self.key, path)
    # the leaf's shape, its leading size unknown for a layer (never used)
    shape = ((0,) + value.shape) if prefix else value.shape

    def shifted(block, pre, start):
      size = block.shape[0] if block.ndim else None
      noise = directions.block_normal(key, shape, pre, start, size,
                                      jnp.float32).reshape(block.shape)
      return block + self._scaled(path, selection, block, noise, pre,
                                  block_rows(block, start))

    return map_blocks(shifted, value, block_size=self.block_size,
                      prefix=prefix)

  def tree(self, params: Any, path: str = '') -> Any:
    """``params + s z`` for a subtree found at ``path`` ('' = the root)."""
    leaves, treedef = jax.tree.flatten(params)
    return jax.tree.unflatten(treedef, [
        self._shift(_join(path, p), v, ())
        for p, v in zip(leaf_paths(params), leaves)])

  def layer(self, layer_params: Any, path: str, index) -> Any:
    """``layer + s z`` for slice ``index`` of the stacked subtree at ``path``."""
    leaves, treedef = jax.tree.flatten(layer_params)
    return jax.tree.unflatten(treedef, [
        self._shift(_join(path, p), v, (index,))
        for p, v in zip(leaf_paths(layer_params), leaves)])

  def rows(self, table: jax.Array, path: str, ids: jax.Array) -> jax.Array:
    """``(table + s z)[ids]`` (an embedding lookup) without perturbing the
    rows that are not looked up."""
    _check_table(table, path)
    selection = self._selection(path)
    values = jnp.take(table, ids, axis=0)
    if selection.frozen:
      return values
    noise = directions.row_normal(directions.leaf_key(self.key, path),
                                  table.shape, ids, jnp.float32)
    return values + self._scaled(path, selection, values, noise, (), ids)

  def matmul_transposed(self, x: jax.Array, table: jax.Array,
                        path: str) -> jax.Array:
    """``x @ (table + s z).T`` (a tied output layer), the noise's part added
    block of table rows by block, so no perturbed table is held."""
    _check_table(table, path)
    selection = self._selection(path)
    out = jnp.einsum('...d,vd->...v', x, table.astype(x.dtype))
    if selection.frozen:
      return out
    key = directions.leaf_key(self.key, path)

    def add_block(block, prefix, start):
      size = block.shape[-1]
      table_rows = jax.lax.dynamic_slice_in_dim(table, start, size, 0)
      noise = directions.block_normal(key, table.shape, (), start, size,
                                      jnp.float32)
      step = self._scaled(path, selection, table_rows, noise, prefix,
                          jnp.asarray(start) + jnp.arange(size))
      return block + jnp.einsum('...d,vd->...v', x, step.astype(x.dtype))

    return map_blocks(add_block, out, block_size=self.block_size,
                      axis=out.ndim - 1,
                      row_size=table.size // table.shape[0])


def _join(prefix: str, path: str) -> str:
  if not prefix:
    return path
  return prefix if not path else f'{prefix}/{path}'


def _check_table(table: jax.Array, path: str) -> None:
  if jnp.ndim(table) != 2:
    raise ValueError(f'{path!r} is used as a table of rows; it must be 2-d, '
                     f'got shape {jnp.shape(table)}.')


def leaf_selections(mask, blockwise: Optional[re.Pattern], params,
                    count) -> dict[str, LeafSelection]:
  """Which entries of each leaf a step perturbs and updates: by ``mask``
  (a zojax mask, or :class:`MagnitudeThresholds` evaluated at ``params``)
  and, for block-wise ZO, the block of step ``count``."""
  paths = leaf_paths(params)
  if isinstance(mask, MagnitudeThresholds):
    chosen = [LeafSelection(threshold=h)
              for h in mask.per_leaf(params)]
  else:
    resolved = resolve_mask(mask, params)
    if all(m is False for m in resolved):
      raise ValueError('the mask freezes every parameter.')
    chosen = [LeafSelection(m) for m in resolved]
  if blockwise is not None:
    _assign_blocks(blockwise, paths, jax.tree.leaves(params), chosen,
                   count)
  return dict(zip(paths, chosen))


def _assign_blocks(pattern, paths, leaves, chosen, count) -> None:
  """Block-wise ZO: step ``count`` selects block ``count mod B``."""
  stacked = [bool(pattern.search(p)) and jnp.ndim(x) >= 1
             for p, x in zip(paths, leaves)]
  layers = {jnp.shape(x)[0] for x, s in zip(leaves, stacked) if s}
  if len(layers) != 1:
    raise ValueError(
        f'blockwise={pattern.pattern!r} must match stacked leaves with '
        f'one leading size; their leading sizes are {sorted(layers)}.')
  num_layers = layers.pop()
  rest = any(not s and not sel.frozen for s, sel in zip(stacked, chosen))
  active = jnp.asarray(count, jnp.int32) % (num_layers + int(rest))
  for s, sel in zip(stacked, chosen):
    sel.block = (active, 'leading' if s else num_layers)
