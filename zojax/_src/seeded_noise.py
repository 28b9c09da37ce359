r"""Perturbations regenerated from a key, block by block.

MeZO's memory saving rests on never storing the direction :math:`z`: it is
drawn again from the step's key whenever it is needed. Here each entry of a
parameter leaf is a counter-based draw (Threefry-2x32, as ``jax.random``)
from the leaf's key and the entry's position:

.. math::
  z_{\text{path}}[i_0, i_1, \dots] = \sqrt 2\,\operatorname{erf}^{-1}
  \big(u(\text{threefry}(k_{\text{path}}; i_0, \operatorname{flat}(i_1,
  \dots)))\big), \qquad k_{\text{path}} = \text{fold\_in}(k,
  \text{crc32}(\text{path})),

with :math:`u` mapping 32 random bits to (-1, 1) and flat the row-major index
over the trailing axes. So any block of the leaf (one layer of a stack of
layers, a few rows of an embedding table, a block of rows of the update) is
drawn without drawing the rest, its random-bit temporaries are as small as
the block, and one draw compiles to one small fusion. A model whose layers
are stacked along a leading axis and run by ``lax.scan`` perturbs layer
``l`` right before using it (:meth:`Perturbation.layer`); the update
regenerates the same numbers block by block (:func:`map_blocks`);
:func:`leaf_noise` draws a whole leaf (for tests and small models).
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Callable, Optional, Sequence

import jax
import jax.extend.random as random_ext
import jax.numpy as jnp

from zojax._src.perturbable import leaf_paths

# Entries per block of ``map_blocks``: at most BLOCK_ELEMENTS (the block's
# draw has a few 32-bit temporaries per entry: tens of MiB), at least
# MIN_BLOCK_ELEMENTS, else 1/256 of the model, so the temporaries stay a small
# fraction of any model while blocks stay large enough for the loop overhead
# not to matter on a GPU (H100, 1.07B params: 81 ms per MeZO step with 2**20
# entries per block, 54 ms with 2**22, same memory).
BLOCK_ELEMENTS = 1 << 22
MIN_BLOCK_ELEMENTS = 1 << 14


def block_elements(num_params: int) -> int:
  """Entries per block for a model of ``num_params`` parameters."""
  return int(min(BLOCK_ELEMENTS, max(MIN_BLOCK_ELEMENTS, num_params // 256)))


Index = Sequence[Any]  # leading indices fixed so far (ints or int scalars)


def path_key(key: jax.Array, path: str) -> jax.Array:
  """The key of one leaf: ``fold_in(key, crc32(path))``."""
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _normal_from_bits(bits: jax.Array, dtype) -> jax.Array:
  r"""Standard normal numbers from uniform 32-bit words (``jax.random``'s
  construction: a float in [1, 2) from 23 bits, mapped to (-1, 1), then
  :math:`\sqrt 2\operatorname{erf}^{-1}`)."""
  one_to_two = jax.lax.bitcast_convert_type(
      (bits >> 9) | jnp.uint32(0x3F800000), jnp.float32)
  lowest = jnp.nextafter(jnp.float32(-1.0), jnp.float32(0.0))
  uniform = jnp.maximum(2.0 * (one_to_two - 1.0) - 1.0, lowest)
  return (jnp.sqrt(jnp.float32(2.0)) * jax.lax.erf_inv(uniform)).astype(dtype)


def block_noise(key: jax.Array, path: str, trailing_shape, prefix: Index,
                rows: Optional[jax.Array], dtype) -> jax.Array:
  """The noise of the block ``leaf[(*prefix, rows)]``.

  Args:
    key: the step key.
    path: the leaf's path.
    trailing_shape: ``leaf.shape[1:]`` (``None`` for a scalar leaf).
    prefix: indices of the leading axes already fixed (e.g. ``(layer,)``).
    rows: indices along the next axis (any integer array: a block
      ``start + arange(n)``, token ids); None for all of that axis, or for
      the one entry when ``prefix`` fixes every axis.
    dtype: the noise's dtype.

  Returns:
    An array of shape ``rows.shape + leaf.shape[len(prefix) + 1:]``.
  """
  if trailing_shape is None:  # a scalar leaf: position (0, 0)
    prefix, trailing_shape = (0,), ()
  trailing_shape = tuple(trailing_shape)
  full_rank = 1 + len(trailing_shape)
  if math.prod(trailing_shape) >= 2**32:
    raise ValueError(f'{path!r}: more than 2**32 entries per leading index.')
  axis = len(prefix)  # the axis ``rows`` indexes
  if rows is None and axis < full_rank:
    if axis == 0:
      raise ValueError('block_noise needs the rows of the leading axis.')
    rows = jnp.arange(trailing_shape[axis - 1])
  rows_shape = () if rows is None else jnp.shape(rows)
  out_shape = rows_shape + trailing_shape[axis:]

  def index(a):  # the index along axis a, broadcastable to out_shape
    if a < axis:
      return jnp.asarray(prefix[a], jnp.uint32)
    if a == axis:
      return jnp.reshape(jnp.asarray(rows, jnp.uint32),
                         rows_shape + (1,) * (full_rank - axis - 1))
    return jax.lax.broadcasted_iota(jnp.uint32, out_shape,
                                    len(rows_shape) + a - axis - 1)

  flat = jnp.zeros((), jnp.uint32)  # row-major over the trailing axes
  for a in range(1, full_rank):
    flat = flat + index(a) * jnp.uint32(math.prod(trailing_shape[a:]))
  words = jax.random.key_data(path_key(key, path)) if jnp.issubdtype(
      jnp.result_type(key), jax.dtypes.prng_key) else path_key(key, path)
  high = jnp.broadcast_to(index(0), out_shape)
  bits, _ = random_ext.threefry2x32_p.bind(
      words[0], words[1], high, jnp.broadcast_to(flat, out_shape))
  return _normal_from_bits(bits, dtype)


def leaf_noise(key: jax.Array, path: str, leaf: jax.Array) -> jax.Array:
  """The noise of a whole leaf."""
  if not leaf.ndim:
    return block_noise(key, path, None, (), None, jnp.result_type(leaf))
  return block_noise(key, path, leaf.shape[1:], (), jnp.arange(leaf.shape[0]),
                     jnp.result_type(leaf))


def map_blocks(fn: Callable[[jax.Array, tuple, jax.Array], jax.Array],
               array: jax.Array, *, block_size: int, prefix: Index = (),
               axis: int = 0, row_size: Optional[int] = None) -> jax.Array:
  """``fn(block, prefix, rows)`` over blocks of ``array``, written back.

  The array is rewritten by a ``fori_loop`` of ``dynamic_update_slice`` over
  blocks of rows (index ranges along ``axis``) of about ``block_size``
  entries; a row larger than that (a whole layer of a stacked leaf) is
  itself split, with its index appended to ``prefix``. When ``array`` is a
  donated buffer or a loop carry it is rewritten in place, and only one
  block's temporaries are alive at a time.

  Args:
    fn: maps a block to an array of the same shape and dtype; ``rows`` holds
      the block's indices along ``axis`` (None for a 0-d ``array``).
    array: the array to rewrite.
    prefix: leading indices already fixed, passed on to ``fn``.
    axis: the axis split into blocks (0, or the last axis for the columns of
      a matmul's output, with ``row_size`` the size of a column's table row).
    block_size: entries per block (see :func:`block_elements`).
    row_size: parameter entries per index of ``axis`` (default: ``array``'s).
  """
  prefix = tuple(prefix)
  if array.ndim == 0:
    return fn(array, prefix, None)
  num_rows = array.shape[axis]
  if row_size is None:
    row_size = array.size // max(num_rows, 1)
  if row_size > block_size and axis == 0 and array.ndim >= 2:
    return jax.lax.fori_loop(
        0, num_rows, lambda i, a: a.at[i].set(map_blocks(
            fn, a[i], block_size=block_size, prefix=prefix + (i,))), array)
  block = max(1, min(num_rows, block_size // max(row_size, 1)))
  num_blocks, remainder = divmod(num_rows, block)
  if num_blocks == 1 and not remainder:
    return fn(array, prefix, jnp.arange(num_rows))

  def rewrite(start, size, values):
    current = jax.lax.dynamic_slice_in_dim(values, start, size, axis)
    new = fn(current, prefix, start + jnp.arange(size))
    return jax.lax.dynamic_update_slice_in_dim(values, new, start, axis)

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
           rows: jax.Array) -> Optional[jax.Array]:
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
               rows: jax.Array) -> jax.Array:
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
    self.key = key
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

  def _step(self, path, selection, values, trailing, prefix, rows):
    """Scaled, masked noise of ``values`` = ``leaf[(*prefix, rows)]``."""
    dtype = jnp.result_type(values)
    step = jnp.asarray(self.scale, dtype) * block_noise(
        self.key, path, trailing, prefix, rows, dtype)
    return selection.restrict(step, values, prefix, rows)

  def _shift(self, path: str, value: jax.Array, prefix: Index) -> jax.Array:
    """``value + s z`` for ``value`` = ``leaf[prefix]`` (prefix: () or a
    layer index)."""
    selection = self._selection(path)
    if selection.frozen:
      return value
    trailing = value.shape if prefix else (value.shape[1:] if value.ndim
                                           else None)
    return map_blocks(
        lambda block, pre, rows: block + self._step(
            path, selection, block, trailing, pre, rows),
        value, block_size=self.block_size, prefix=prefix)

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
    return values + self._step(path, selection, values, table.shape[1:], (),
                               ids)

  def matmul_transposed(self, x: jax.Array, table: jax.Array,
                        path: str) -> jax.Array:
    """``x @ (table + s z).T`` (a tied output layer), the noise's part added
    block of table rows by block, so no perturbed table is held."""
    _check_table(table, path)
    selection = self._selection(path)
    out = jnp.einsum('...d,vd->...v', x, table.astype(x.dtype))
    if selection.frozen:
      return out

    def add_block(block, prefix, rows):
      table_rows = jnp.take(table, rows, axis=0)
      step = self._step(path, selection, table_rows, table.shape[1:], prefix,
                        rows)
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
