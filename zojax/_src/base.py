"""The transform type and state shared by zojax estimators."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from zojax._src.stats import EstimateStats


class EstimatorState(NamedTuple):
  """State of a zojax estimator: a PRNG key (split every step) and counters.

  It is a plain pytree of arrays, so it can be checkpointed with
  ``flax.serialization`` or orbax and restored to continue the exact same
  trajectory.
  """

  key: jax.Array
  stats: EstimateStats


class ZerothOrderTransform(optax.GradientTransformationExtraArgs):
  """An ``optax.GradientTransformationExtraArgs`` with an ask/tell interface.

  ``init`` and ``update`` are the optax pair (``update`` needs the extra
  argument ``obj_fn``). ``ask`` and ``tell`` are the same estimator's pure core
  for objectives that cannot run inside ``jit`` (a simulator, a lab, a human):

  * ``ask(key, params)`` returns the points to evaluate, as a pytree shaped
    like ``params`` with a leading axis;
  * ``tell(key, params, values)`` takes the objective values at those points
    (a vector, in the same order) and returns the gradient estimate.

  Passing ``key`` = the second half of ``jax.random.split(state.key)``
  reproduces exactly the step that ``update`` would take from ``state``.
  """

  ask: Optional[Callable[[jax.Array, Any], Any]]
  tell: Optional[Callable[[jax.Array, Any, Any], Any]]

  def __new__(cls, init, update, ask=None, tell=None):
    transform = super().__new__(cls, init, update)
    transform.ask = ask
    transform.tell = tell
    return transform


def key_from_seed(seed) -> jax.Array:
  """A raw uint32 PRNG key from an int seed, or the given key itself."""
  if isinstance(seed, (int, jnp.integer)) and not isinstance(seed, bool):
    return jax.random.PRNGKey(seed)
  key = jnp.asarray(seed)
  if not jnp.issubdtype(key.dtype, jnp.unsignedinteger) and not (
      jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
    raise ValueError(f'seed must be an int or a PRNG key, got {seed!r}.')
  return key
