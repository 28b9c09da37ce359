"""Seeds and keys: what ``seed=`` accepts and how the state holds the key.

Every randomized zojax method takes ``seed=``: a Python or NumPy integer, an
integer array (also a traced one, e.g. a seed under ``jax.vmap``), a typed
PRNG key (``jax.random.key(0)``) or raw key data (``jax.random.PRNGKey(0)``).
The state keeps the key as *raw* ``uint32[2]`` Threefry key data, so any
checkpointer (``flax.serialization``, orbax) stores it, and every ``init``
returns a fresh buffer (a donated state never aliases the transform's own
key). A typed key of another implementation (``'rbg'``) is turned into
Threefry key data by drawing two words from it.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

IMPL = 'threefry2x32'


def key_data(seed) -> jax.Array:
  """Fresh raw Threefry key data ``uint32[2]`` from a seed (see module doc).

  Raises:
    ValueError: for a seed that is neither an integer nor a key.
  """
  if isinstance(seed, bool):
    raise ValueError(f'seed must be an integer or a PRNG key, got {seed!r}.')
  if isinstance(seed, numbers.Integral):
    return jax.random.key_data(jax.random.key(int(seed), impl=IMPL))
  try:
    array = jnp.asarray(seed)
  except TypeError:
    raise ValueError(
        f'seed must be an integer or a PRNG key, got {seed!r}.') from None
  if jnp.issubdtype(array.dtype, jax.dtypes.prng_key):
    if array.shape:
      raise ValueError(f'seed must be a single key, got shape {array.shape}.')
    if str(jax.random.key_impl(array)) == IMPL or 'threefry' in str(
        jax.random.key_impl(array)):
      return jnp.copy(jax.random.key_data(array))
    return jax.random.bits(array, (2,), jnp.uint32)
  if jnp.issubdtype(array.dtype, jnp.integer) and array.shape == ():
    return jax.random.key_data(jax.random.key(array, impl=IMPL))
  if array.dtype == jnp.uint32 and array.shape == (2,):
    return jnp.copy(array)
  raise ValueError(
      'seed must be an integer (or a scalar integer array) or a PRNG key '
      f'(typed, or raw uint32[2]); got dtype {array.dtype}, shape '
      f'{array.shape}.')


def check_seed(seed) -> None:
  """Raises at construction for a seed :func:`key_data` would reject (a
  traced seed is checked when ``init`` uses it)."""
  if not isinstance(seed, jax.core.Tracer):
    key_data(seed)


def split(key: jax.Array, num: int = 2) -> jax.Array:
  """``jax.random.split`` of raw Threefry key data (``(num, 2)`` uint32)."""
  return jax.random.key_data(jax.random.split(typed(key), num))


def fold_in(key: jax.Array, data) -> jax.Array:
  """``jax.random.fold_in`` of raw Threefry key data."""
  return jax.random.key_data(jax.random.fold_in(typed(key), data))


def advance(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(next_state_key, step_key)``: the state's key split once per step."""
  keys = split(key)
  return keys[0], keys[1]


def step_key(key: jax.Array) -> jax.Array:
  """The key of the step the state's ``key`` is about to take (what ``ask``
  uses; ``ask`` does not advance the state)."""
  return advance(key)[1]


def typed(key: jax.Array) -> jax.Array:
  """A typed key from raw Threefry key data (for ``jax.random`` calls)."""
  return jax.random.wrap_key_data(key, impl=IMPL)
