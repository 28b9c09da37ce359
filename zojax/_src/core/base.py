r"""The one transform type of zojax and its ask/tell contract.

Every estimator and optimizer of zojax is a :class:`ZerothOrderTransform`:
an ``optax.GradientTransformationExtraArgs`` (``init``, ``update``) with two
more functions for objectives that cannot run inside ``jit`` (a simulator, a
lab, a person ranking images):

* ``points = tx.ask(state, params)``: the points the next step evaluates, a
  pytree like ``params`` with a leading axis of points. The key comes from
  the state; ``ask`` does not advance it.
* ``updates, new_state = tx.tell(state, params, points, values)``: ``values``
  has one number per point (for rank-based methods: candidate indices,
  best first). ``tell(state, params, ask(state, params), values)`` returns
  exactly what ``update`` returns when the objective takes those values:
  the same updates, the same new state, the evaluations counted and the key
  advanced.

Methods that update parameters in place (:func:`zojax.mezo`) also have
``step(params, state, ...) -> (params, state)``.

State conventions (shared by every method, federated ones included): the
state is a ``NamedTuple`` of arrays holding ``key`` (raw Threefry key data,
split every step, see :mod:`zojax._src.core.keys`) and ``stats``
(:class:`zojax.EstimateStats`, read by :func:`zojax.estimate_info`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import optax

from zojax._src.core.stats import EstimateStats


class EstimatorState(NamedTuple):
  """State of a direction-based estimator: a PRNG key (raw ``uint32[2]``,
  split every step) and counters. A plain pytree of arrays: checkpoint it
  with ``flax.serialization`` or orbax and resume the same trajectory."""

  key: jax.Array
  stats: EstimateStats


Ask = Callable[[Any, Any], Any]
Tell = Callable[[Any, Any, Any, Any], tuple[Any, Any]]


class ZerothOrderTransform(optax.GradientTransformationExtraArgs):
  """An optax transform with ``ask``/``tell`` (and, for in-place methods,
  ``step``); see the module docstring for the contract."""

  ask: Optional[Ask]
  tell: Optional[Tell]
  step: Optional[Callable[..., tuple[Any, Any]]]

  def __new__(cls, init, update, ask: Ask, tell: Tell, step=None):
    transform = super().__new__(cls, init, update)
    transform.ask = ask
    transform.tell = tell
    transform.step = step
    return transform


def unsupported_ask_tell(name: str, reason: str) -> tuple[Ask, Tell]:
  """``ask``/``tell`` for a transform that cannot evaluate its step in one
  round of points; both raise a clear error saying why and what to use."""

  def refuse(*args, **kwargs):
    del args, kwargs
    raise ValueError(f'{name} has no ask/tell: {reason}')

  return refuse, refuse
