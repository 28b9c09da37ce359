"""Random perturbation directions, regenerated from a key, one leaf at a time.

Direction ``i`` of a step is a pure function of ``(step_key, i)``: its key is
``fold_in(step_key, i)`` and each leaf's key is ``fold_in(that, leaf_index)``,
where ``leaf_index`` is the leaf's position among *all* leaves of ``params``.
So a direction never has to be stored: any device or any later pass can
regenerate exactly the same numbers, and freezing one leaf with a mask leaves
the directions of the other leaves unchanged.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from zojax._src import backend
from zojax._src.perturbable import Perturbable

DISTRIBUTIONS = ('gaussian', 'sphere', 'rademacher')

SIGNS_PER_WORD = 32


def rademacher_words(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Random 32-bit words holding one sign bit per entry of ``shape``."""
  size = math.prod(shape)
  return jax.random.bits(key, (-(-size // SIGNS_PER_WORD),), jnp.uint32)


def unpack_signs(words: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """±1.0 (float32) from the bits of ``words``: bit b of word w is entry
  ``32 w + b``; a set bit is -1."""
  shifts = jnp.arange(SIGNS_PER_WORD, dtype=jnp.uint32)
  bits = (words[..., None] >> shifts) & jnp.uint32(1)
  signs = 1.0 - 2.0 * bits.astype(jnp.float32)
  lead = words.shape[:-1]
  size = math.prod(shape)
  return signs.reshape(lead + (-1,))[..., :size].reshape(lead + tuple(shape))


def rademacher(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """I.i.d. ±1 entries (float32), 32 of them unpacked from each random word.

  ``jax.random.rademacher`` spends a whole random draw per sign; unpacking the
  bits of ``jax.random.bits`` costs 1/32 of a word per sign, which is what makes
  Rademacher directions nearly free next to a forward pass on a CPU.
  """
  return unpack_signs(rademacher_words(key, shape), shape)


def draw_direction(
    step_key: jax.Array,
    index: jax.Array,
    space: Perturbable,
    distribution: str,
) -> tuple[jax.Array, ...]:
  """Direction ``index`` of a step in compact form (see :func:`expand`).

  ``'gaussian'``: z ~ N(0, I); on accelerators kept as its per-leaf keys and
  regenerated in every consumer (cheaper there than a round trip through
  memory), on a CPU drawn once per chunk.
  ``'rademacher'``: z uniform on {-1, +1}^d, kept as packed sign bits (uint32
  words, 1/32 of the size) until used. ``'sphere'``: u = z / ||z|| uniform on
  the unit sphere of the active coordinates (the norm is taken after masking).
  """
  query_key = jax.random.fold_in(step_key, index)
  keys = tuple(jax.random.fold_in(query_key, leaf_index)
               for leaf_index in space.active)
  if distribution == 'rademacher':
    return tuple(rademacher_words(k, shape)
                 for k, shape in zip(keys, space.shapes))
  if distribution == 'gaussian' and backend.on_accelerator():
    return keys
  direction = space.apply_mask([jax.random.normal(k, shape, jnp.float32)
                                for k, shape in zip(keys, space.shapes)])
  if distribution == 'sphere':
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(d)) for d in direction))
    direction = tuple(d / norm for d in direction)
  return tuple(direction)


def expand(compact: tuple[jax.Array, ...], space: Perturbable,
           distribution: str) -> tuple[jax.Array, ...]:
  """The float32 direction (masked) from the output of :func:`draw_direction`.

  Elementwise work that XLA fuses into each consumer (the perturbed forward
  and the accumulation) instead of writing the full direction to memory.
  """
  if distribution == 'rademacher':
    return space.apply_mask([unpack_signs(w, shape)
                             for w, shape in zip(compact, space.shapes)])
  if distribution == 'gaussian' and backend.on_accelerator():
    return space.apply_mask([jax.random.normal(k, shape, jnp.float32)
                             for k, shape in zip(compact, space.shapes)])
  return compact
