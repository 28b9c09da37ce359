r"""One direction generator for every method: counter-based, block by block.

A direction (or a noise draw) is never stored: every entry is a pure
function of the step's key :math:`k`, the query index :math:`i`, the leaf's
path :math:`p` and the entry's position, so any device, any later pass and
any block of a leaf regenerate exactly the same numbers. RGE, forward
gradients, ZO-RankSGD, MeZO, CBO's and Deep GA's noise and FedKSeed's seed
pool all draw through this module, so the same seed gives the same
:math:`z` in ``rge`` and ``mezo``.

The scheme. A leaf of shape :math:`(n_0, n_1, \dots)` is seen as a table of
rows :math:`r = i_0` and columns :math:`c = \operatorname{flat}(i_1,
\dots)` (row-major); a 1-d leaf is one row (:math:`r = 0`, :math:`c = i_0`),
a scalar the single entry :math:`(0, 0)`. With the leaf key
:math:`k_{ip} = \text{fold\_in}(\text{fold\_in}(k, i), \text{crc32}(p))`,
the row's stream of random 32-bit words is

.. math::
  W(r, w) = \text{threefry2x32}(k_{ip};\; r,\; \lfloor w/2 \rfloor)_{w \bmod 2}

(both output words of every Threefry call are used). Entry :math:`(r, c)`
is, for ``'gaussian'``, :math:`\sqrt2\,\operatorname{erf}^{-1}(u(W(r, c)))`
(``jax.random``'s construction of a normal from 32 bits); for
``'rademacher'``, :math:`\pm 1` from bit :math:`c \bmod 32` of
:math:`W(r, \lfloor c/32 \rfloor)`. So a block of rows, a slice of a stacked
layer or the rows of an embedding looked up by token ids is drawn without
the rest of the leaf, and one draw compiles to one small fusion that XLA can
place inside its consumer.
"""

from __future__ import annotations

import math
import zlib
from typing import Optional, Sequence

import jax
import jax.extend.random as random_ext
import jax.numpy as jnp

from zojax._src.core import backend
from zojax._src.core import keys as keys_lib
from zojax._src.query import engine

DISTRIBUTIONS = ('gaussian', 'sphere', 'rademacher')
SIGNS_PER_WORD = 32


def query_key(step_key: jax.Array, index) -> jax.Array:
  """The key of query ``index`` of a step: ``fold_in(step_key, index)``."""
  return keys_lib.fold_in(step_key, index)


def leaf_key(key: jax.Array, path: str) -> jax.Array:
  """The key of one leaf: ``fold_in(key, crc32(path))`` (raw ``uint32[2]``)."""
  return keys_lib.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def table_shape(shape: Sequence[int]) -> tuple[int, int]:
  """``(rows, columns)`` of a leaf in the generator's table view."""
  shape = tuple(shape)
  if len(shape) >= 2:
    return shape[0], math.prod(shape[1:])
  return 1, (shape[0] if shape else 1)


def words(key: jax.Array, rows, start, count: int, *,
          start_is_even: bool = False) -> jax.Array:
  """Words :math:`W(r, w)` for ``w`` in ``[start, start + count)``.

  Two computations of the same words, chosen by the backend. On a CPU, where
  hashing is the cost (the draw is not fused), one Threefry call per pair of
  words, its two outputs interleaved. On an accelerator, every word hashes
  its own counter ``w // 2`` and keeps output ``w % 2``. That is twice the
  Threefry rounds, but it is elementwise, so XLA fuses the whole draw, hash
  and transform, into one kernel instead of writing the words to memory
  between several. One H100, ``experiments/bench_generator.py``: drawing and
  adding 2^30 normals takes 7.4 ms instead of 8.8 ms; a MeZO step on a 1.07B
  decoder takes 47 ms instead of 52 ms (TPUs take the same path; not
  measured there). On the 2-core CPU the per-word computation would take
  13 ns per normal instead of 6.

  Args:
    key: the leaf key (raw ``uint32[2]``).
    rows: row indices, any integer array (the output has its shape
      followed by ``count``) or a scalar.
    start: first word index (an int, or a traced int scalar).
    count: number of words (static).
    start_is_even: the caller knows that a traced ``start`` is even (a
      block of whole table rows of even length): on a CPU the words are
      then the outputs of whole Threefry calls, with no shift by a traced
      offset.
  """
  rows = jnp.asarray(rows, jnp.uint32)
  key = jnp.asarray(key, jnp.uint32)
  if backend.on_accelerator():
    return words_by_entry(key, rows, start, count)
  return words_by_pair(key, rows, start, count, start_is_even=start_is_even)


def words_by_pair(key: jax.Array, rows: jax.Array, start, count: int, *,
                  start_is_even: bool = False) -> jax.Array:
  """:func:`words` from one Threefry call per pair of words (the CPU's)."""
  even_start = start_is_even or (isinstance(start, int) and start % 2 == 0)
  pairs = -(-count // 2) if even_start else count // 2 + 1
  first = jnp.asarray(start, jnp.uint32) >> 1
  out0, out1 = _threefry(key, rows,
                         first + jnp.arange(pairs, dtype=jnp.uint32))
  stream = jnp.stack([out0, out1], axis=-1).reshape(rows.shape + (2 * pairs,))
  if even_start:
    return stream[..., :count]
  offset = jnp.asarray(start, jnp.int32) % 2
  return jax.lax.dynamic_slice_in_dim(stream, offset, count,
                                      axis=stream.ndim - 1)


def words_by_entry(key: jax.Array, rows: jax.Array, start,
                   count: int) -> jax.Array:
  """:func:`words` with one Threefry call per word, keeping output
  ``w % 2`` of the call on counter ``w // 2`` (the accelerators')."""
  index = jnp.asarray(start, jnp.uint32) + jnp.arange(count, dtype=jnp.uint32)
  out0, out1 = _threefry(key, rows, index >> 1)
  return jnp.where((index & 1) == 1, out1, out0)


def _threefry(key: jax.Array, rows: jax.Array, counters: jax.Array):
  """Both outputs of Threefry-2x32 on the counters ``(row, c)`` for every
  row and every ``c`` of the 1-d ``counters`` (shape ``rows.shape +
  counters.shape``)."""
  high = jnp.broadcast_to(rows[..., None], rows.shape + counters.shape)
  low = jnp.broadcast_to(counters, high.shape)
  return random_ext.threefry2x32_p.bind(key[0], key[1], high, low)


def normal_from_words(bits: jax.Array, dtype=jnp.float32) -> jax.Array:
  r"""Standard normals from uniform 32-bit words (``jax.random``'s
  construction: a float in [1, 2) from 23 bits, mapped to (-1, 1), then
  :math:`\sqrt 2\operatorname{erf}^{-1}`)."""
  one_to_two = jax.lax.bitcast_convert_type(
      (bits >> 9) | jnp.uint32(0x3F800000), jnp.float32)
  lowest = jnp.nextafter(jnp.float32(-1.0), jnp.float32(0.0))
  uniform = jnp.maximum(2.0 * (one_to_two - 1.0) - 1.0, lowest)
  return (jnp.sqrt(jnp.float32(2.0)) * jax.lax.erf_inv(uniform)).astype(dtype)


def signs_from_words(packed: jax.Array, count: int) -> jax.Array:
  """±1.0 (float32) for ``count`` entries from packed words along the last
  axis: entry ``c`` is bit ``c % 32`` of word ``c // 32``; a set bit is -1."""
  shifts = jnp.arange(SIGNS_PER_WORD, dtype=jnp.uint32)
  bits = (packed[..., None] >> shifts) & jnp.uint32(1)
  signs = 1.0 - 2.0 * bits.astype(jnp.float32)
  return signs.reshape(packed.shape[:-1] + (-1,))[..., :count]


def packed_signs(key: jax.Array, shape: Sequence[int]) -> jax.Array:
  """A leaf's Rademacher signs as packed words ``(rows, ceil(cols/32))``
  (the compact form RGE keeps until the signs are used)."""
  rows, cols = table_shape(shape)
  return words(key, jnp.arange(rows), 0, -(-cols // SIGNS_PER_WORD))


def unpack_signs(packed: jax.Array, shape: Sequence[int]) -> jax.Array:
  """The signs of :func:`packed_signs`, shaped like the leaf."""
  _, cols = table_shape(shape)
  return signs_from_words(packed, cols).reshape(tuple(shape))


def leaf_normal(key: jax.Array, shape: Sequence[int],
                dtype=jnp.float32) -> jax.Array:
  """A whole leaf of standard normals."""
  rows, cols = table_shape(shape)
  return normal_from_words(words(key, jnp.arange(rows), 0, cols),
                           dtype).reshape(tuple(shape))


def leaf_draw(key: jax.Array, shape: Sequence[int],
              distribution: str) -> jax.Array:
  """A whole leaf, float32: normals, or signs for ``'rademacher'``."""
  if distribution == 'rademacher':
    return unpack_signs(packed_signs(key, shape), shape)
  return leaf_normal(key, shape)


def block_normal(key: jax.Array, shape: Sequence[int], prefix: Sequence,
                 start, size: Optional[int], dtype) -> jax.Array:
  """Normals of the block ``leaf[(*prefix, start:start + size)]``.

  Args:
    key: the leaf key.
    shape: the whole leaf's shape.
    prefix: indices of the leading axes already fixed (e.g. ``(layer,)``);
      may fix every axis (``size`` is then ``None``: one entry).
    start: first index along the next axis (int or traced int).
    size: how many indices along it (static).
    dtype: of the output.

  Returns:
    An array of shape ``(size,) + shape[len(prefix) + 1:]``.
  """
  shape, prefix = tuple(shape), tuple(prefix)
  axis = len(prefix)
  if len(shape) >= 2 and axis == 0:
    cols = math.prod(shape[1:])
    draw = words(key, jnp.asarray(start) + jnp.arange(size), 0, cols)
    return normal_from_words(draw, dtype).reshape((size,) + shape[1:])
  row = prefix[0] if len(shape) >= 2 else 0
  inner = shape[1:] if len(shape) >= 2 else shape
  fixed = prefix[1:] if len(shape) >= 2 else prefix
  column = jnp.zeros((), jnp.int32)
  for index, dim in zip(fixed, range(len(fixed))):
    column = column + jnp.asarray(index, jnp.int32) * math.prod(
        inner[dim + 1:])
  if len(fixed) == len(inner):  # one entry
    return normal_from_words(words(key, row, column, 1), dtype).reshape(())
  stride = math.prod(inner[len(fixed) + 1:])
  column = column + jnp.asarray(start, jnp.int32) * stride
  start_column = int(column) if _is_static(column) else column
  # the first column is even whatever the indices when every index's
  # multiplier is (e.g. a block of rows of a stacked layer)
  multipliers = [math.prod(inner[dim + 1:]) for dim in range(len(fixed))]
  even = all(m % 2 == 0 for m in multipliers + [stride])
  draw = words(key, row, start_column, size * stride, start_is_even=even)
  return normal_from_words(draw, dtype).reshape(
      (size,) + inner[len(fixed) + 1:])


def row_normal(key: jax.Array, shape: Sequence[int], ids: jax.Array,
               dtype) -> jax.Array:
  """Normals of the rows ``leaf[ids]`` of a 2-d leaf (an embedding lookup:
  only the rows looked up are drawn). Shape ``ids.shape + shape[1:]``."""
  _, cols = table_shape(shape)
  return normal_from_words(words(key, ids, 0, cols), dtype).reshape(
      jnp.shape(ids) + tuple(shape[1:]))


def _is_static(x) -> bool:
  try:
    int(x)
    return True
  except (TypeError, jax.errors.ConcretizationTypeError):
    return False


def random_directions(step_key: jax.Array, space, count: int,
                      distribution: str, scale=None):
  """The ``count`` random directions of one step (:class:`engine.Directions`).

  Direction ``i`` draws every active leaf of ``space`` from
  ``leaf_key(query_key(step_key, i), path)``. ``'gaussian'``: z ~ N(0, I);
  on accelerators kept as its leaf keys and regenerated in every consumer
  (cheaper there than a round trip through memory), on a CPU drawn once
  per chunk. ``'rademacher'``: z uniform on {-1, +1}^d, kept as packed sign
  words (1/32 of the size) until used. ``'sphere'``: u = z / ||z|| uniform on
  the unit sphere of the active coordinates (the norm is taken after the
  mask). The scale is ``phi / count`` (``phi = d`` for the sphere, the
  number of perturbed coordinates, else 1) unless ``scale`` is given.
  """
  if scale is None:
    phi = space.num_coordinates() if distribution == 'sphere' else 1.0
    scale = phi / count
  on_accelerator = backend.on_accelerator()

  def make(index):
    key = query_key(step_key, index)
    keys = tuple(leaf_key(key, path) for path in space.paths)
    if distribution == 'rademacher':
      return tuple(packed_signs(k, shape) for k, shape in zip(keys,
                                                              space.shapes))
    if distribution == 'gaussian' and on_accelerator:
      return keys
    direction = space.apply_mask(
        [leaf_normal(k, shape) for k, shape in zip(keys, space.shapes)])
    if distribution == 'sphere':
      norm = jnp.sqrt(sum(jnp.sum(jnp.square(d)) for d in direction))
      direction = tuple(d / norm for d in direction)
    return tuple(direction)

  def expand(compact):
    if distribution == 'rademacher':
      return space.apply_mask([unpack_signs(w, shape)
                               for w, shape in zip(compact, space.shapes)])
    if distribution == 'gaussian' and on_accelerator:
      return space.apply_mask([leaf_normal(k, shape)
                               for k, shape in zip(compact, space.shapes)])
    return compact

  return engine.Directions(count, make, scale, space, expand)


def matrix_directions(matrix: jax.Array, space, scale=1.0):
  """Directions given as the rows of a ``(count, d)`` matrix over a space of
  one flat leaf (e.g. FedZO's orthonormalised Gaussian sample)."""
  return engine.Directions(matrix.shape[0], lambda i: (matrix[i],), scale,
                           space)
