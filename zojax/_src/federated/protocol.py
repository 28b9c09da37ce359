r"""Federated zeroth-order optimization: what every algorithm shares.

A simulation has :math:`N` clients with local objectives
:math:`f_i(x) = ` ``client_fn(x, data_i)``, where ``client_data`` is a pytree
whose leaves have a leading axis of :math:`N` (client :math:`i` sees slice
:math:`i`), and the global objective :math:`F = \sum_i p_i f_i` with client
weights :math:`p_i` (uniform by default). Clients are a ``vmap`` axis; with a
``mesh`` and ``client_axis`` the per-client arrays are laid out over that
mesh axis and XLA splits the clients' work over its devices. Every random
draw is keyed by (round, client index), so the result does not depend on how
the clients are placed.

An algorithm is a :class:`FederatedAlgorithm`: ``init(params, num_clients,
weights=None)`` and ``round(params, state, client_fn, client_data)`` →
``(params, state, RoundInfo)``, pure and jit-able (``client_fn`` static).
:func:`run` jits one round and runs ``R`` of them. Parameters are flattened
to one float32 vector (``jax.flatten_util.ravel_pytree``) inside a round.

Costs are counted honestly in :class:`RoundInfo`: every objective evaluation
of every client (``queries``), and the bytes each direction carries
(float32 numbers and int32 indices, 4 bytes each, summed over clients).

State conventions are zojax's (:mod:`zojax._src.core.base`): every state holds
``key`` (raw key data; ``seed=`` accepts what every zojax method accepts) and
``stats`` (:class:`zojax.EstimateStats`: ``steps`` counts rounds, the
evaluations are those of all clients, ``value`` is the round's
:math:`\sum_i p_i f_i(x_r)`), so :func:`zojax.estimate_info` reads a
federated state too.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from zojax._src.core import checks
from zojax._src.core import keys as keys_lib
from zojax._src.core.perturbable import flatten_params as flatten
from zojax._src.query import sharding

BYTES_PER_NUMBER = 4  # float32 values and int32 indices


class RoundInfo(NamedTuple):
  """What one round cost and saw (summed over clients).

  Attributes:
    value: :math:`\\sum_i p_i f_i(x_r)` at the round's starting params, from
      the clients' own evaluations there (FedKSeed: the mean of its first
      :math:`\\pm` pair, equal up to :math:`O(\\epsilon^2)`).
    queries: objective evaluations spent this round by all clients.
    bytes_up: bytes all clients sent to the server this round.
    bytes_down: bytes the server sent to all clients this round.
  """

  value: jax.Array
  queries: jax.Array
  bytes_up: jax.Array
  bytes_down: jax.Array


class FederatedAlgorithm(NamedTuple):
  """``init(params, num_clients, weights=None) -> state`` and
  ``round(params, state, client_fn, client_data) -> (params, state,
  RoundInfo)``."""

  init: Callable[..., Any]
  round: Callable[..., Any]


class Clients(NamedTuple):
  """The server's view of the clients, kept in every algorithm's state.

  Attributes:
    weights: ``(N,)`` float32 :math:`p_i`, summing to 1.
  """

  weights: jax.Array

  @classmethod
  def create(cls, num_clients: int, weights=None) -> 'Clients':
    checks.validate_positive_int('num_clients', num_clients)
    if weights is None:
      return cls(jnp.full((num_clients,), 1.0 / num_clients, jnp.float32))
    weights = np.asarray(weights, np.float64)
    if weights.shape != (num_clients,):
      raise ValueError(f'weights must have shape ({num_clients},) (one per '
                       f'client), got {weights.shape}.')
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or (
        weights.sum() <= 0):
      raise ValueError('client weights must be finite, >= 0 and not all 0.')
    return cls(jnp.asarray(weights / weights.sum(), jnp.float32))

  @property
  def count(self) -> int:
    return self.weights.shape[0]

  def average(self, per_client: jax.Array) -> jax.Array:
    """:math:`\\sum_i p_i v_i` over the leading (client) axis."""
    return jnp.tensordot(self.weights, per_client, axes=1)


def check_round_args(name: str, params, size: int, clients: Clients,
                     client_fn, client_data, dim: int) -> None:
  """Clear errors for a round's arguments (``size``: entries of
  ``params``; ``dim``: what the state was initialised for)."""
  if client_fn is None:
    raise ValueError(f'{name}: round() needs client_fn(params, data_i).')
  leaves = jax.tree.leaves(client_data)
  if not leaves:
    raise ValueError(f'{name}: client_data is empty; it needs one slice per '
                     'client along a leading axis.')
  counts = {np.shape(x)[0] if np.ndim(x) else 'a scalar' for x in leaves}
  if counts != {clients.count}:
    raise ValueError(
        f'{name}: every leaf of client_data needs a leading axis of '
        f'{clients.count} (the number of clients in the state); got leading '
        f'sizes {sorted(counts, key=str)}.')
  if size != dim:
    raise ValueError(f'{name}: params have {size} entries but the '
                     f'state was initialised for {dim}.')
  one_client = jax.tree.map(lambda x: x[0], client_data)
  checks.check_scalar_objective(lambda p: client_fn(p, one_client), params)


class RoundStart(NamedTuple):
  """What every round begins with (see :func:`start_round`)."""

  dim: int
  x: jax.Array
  unflatten: Callable[[jax.Array], Any]
  objective: Callable[[jax.Array, Any], jax.Array]
  keys: jax.Array


def start_round(name: str, params, state, client_fn, client_data,
                dim: int) -> RoundStart:
  """Checks a round's arguments against ``state`` (which has ``key``,
  ``stats`` and ``clients``), flattens ``params`` and derives the
  clients' keys for this round."""
  x, unflatten = flatten(params)
  check_round_args(name, params, x.shape[0], state.clients, client_fn,
                   client_data, dim)
  keys = client_keys(keys_lib.fold_in(state.key, state.stats.steps),
                     state.clients.count)
  return RoundStart(dim, x, unflatten, client_objective(client_fn, unflatten),
                    keys)


def client_objective(client_fn, unflatten) -> Callable[[jax.Array, Any],
                                                         jax.Array]:
  """``f_i`` of a flat vector, as float32: ``(x, data_i) -> scalar``."""
  return lambda x, data: jnp.asarray(client_fn(unflatten(x), data),
                                     jnp.float32)


def client_keys(key: jax.Array, num_clients: int) -> jax.Array:
  """One key per client, fixed by the client's index."""
  return jax.vmap(lambda i: keys_lib.fold_in(key, i))(
      jnp.arange(num_clients))


class ClientLayout(NamedTuple):
  """Where the per-client arrays live: nowhere in particular, or split over
  ``client_axis`` of ``mesh``."""

  mesh: Optional[jax.sharding.Mesh]
  client_axis: Optional[str]

  @classmethod
  def create(cls, mesh, client_axis) -> 'ClientLayout':
    if (mesh is None) != (client_axis is None):
      raise ValueError('give both mesh and client_axis, or neither.')
    if mesh is not None and client_axis not in mesh.axis_names:
      raise ValueError(f'client_axis {client_axis!r} is not an axis of the '
                       f'mesh {mesh.axis_names}.')
    return cls(mesh, client_axis)

  def check(self, num_clients: int) -> None:
    if self.mesh is not None and num_clients % self.mesh.shape[
        self.client_axis]:
      raise ValueError(
          f'{num_clients} clients do not split evenly over the '
          f'{self.mesh.shape[self.client_axis]} devices of mesh axis '
          f'{self.client_axis!r}.')

  def map(self, fn: Callable, per_client: tuple, replicated: tuple = ()):
    """``vmap(fn)`` over the clients: ``fn(*client_slices, *replicated)``.

    ``per_client`` arrays have the leading client axis; ``replicated`` ones
    are passed whole to every client (as arguments, not closures, which
    meshes with Explicit axes do not allow). With a mesh, a ``shard_map``
    over ``client_axis`` gives each device its clients.
    """
    in_axes = (0,) * len(per_client) + (None,) * len(replicated)
    clients_fn = jax.vmap(fn, in_axes=in_axes)
    args = tuple(per_client) + tuple(replicated)
    if self.mesh is None:
      return clients_fn(*args)
    specs = (P(self.client_axis),) * len(per_client) + (P(),) * len(
        replicated)
    out = jax.shard_map(
        clients_fn, mesh=self.mesh, in_specs=specs,
        out_specs=P(self.client_axis), check_vma=False)(
            *sharding.in_layout(self.mesh, args, specs))
    # The server's sums over clients need the results in one place; on a
    # mesh with Explicit axes that is an explicit reshard.
    return sharding.in_layout(self.mesh, (out,), (P(),))[0]


def server_step(x: jax.Array, clients: Clients, local: jax.Array,
                server_lr: float) -> jax.Array:
  r""":math:`x_{r+1} = x_r + \eta_g \sum_i p_i (x_i - x_r)` (FedAvg)."""
  return x + server_lr * clients.average(local - x[None])


def dense_bytes(num_clients: int, numbers_per_client: int) -> jax.Array:
  """Bytes for every client sending (or receiving) that many numbers."""
  return jnp.asarray(num_clients * numbers_per_client * BYTES_PER_NUMBER,
                     jnp.int32)


def local_descent(optimizer, gradient_fn: Callable, x: jax.Array,
                  steps: int, carry: Any = None,
                  after_step: Optional[Callable] = None):
  """``steps`` steps of a fresh ``optimizer`` from ``x`` (a ``lax.scan``).

  ``gradient_fn(x, t, carry) -> (gradient, carry, value)`` gets the 1-based
  step number ``t``; ``after_step(new_x, t, carry) -> carry``, if given,
  sees each new point. Returns the final point, carry and the per-step
  values.
  """
  def body(state, t):
    point, opt_state, extra = state
    gradient, extra, value = gradient_fn(point, t, extra)
    update, opt_state = optimizer.update(gradient, opt_state, point)
    point = point + update
    if after_step is not None:
      extra = after_step(point, t, extra)
    return (point, opt_state, extra), value

  (x, _, carry), values = jax.lax.scan(
      body, (x, optimizer.init(x), carry), jnp.arange(1, steps + 1))
  return x, carry, values


def run(algorithm: FederatedAlgorithm, params, client_fn, client_data, *,
        rounds: int, weights=None, eval_fn: Optional[Callable] = None,
        state=None):
  """Runs ``rounds`` rounds (one jitted round function, compiled once).

  Args:
    algorithm: e.g. :func:`zojax.federated.fedzo`.
    params: starting global parameters (any pytree of float arrays).
    client_fn: ``client_fn(params, data_i) -> scalar``.
    client_data: pytree with a leading client axis.
    rounds: :math:`R`.
    weights: client weights :math:`p_i` (default uniform); ignored when
      ``state`` is given.
    eval_fn: optional ``eval_fn(params) -> scalar`` recorded after every
      round (e.g. the global objective or a test accuracy; not counted as
      queries: it is the experimenter's measurement, not the algorithm's).
    state: continue from this state instead of ``algorithm.init``.

  Returns:
    ``(params, state, history)``; ``history`` maps ``'value'``,
    ``'queries'``, ``'bytes_up'``, ``'bytes_down'`` (per round) and, with
    ``eval_fn``, ``'eval'`` (after each round) to numpy arrays of length
    ``rounds``.
  """
  num_clients = {np.shape(x)[0] if np.ndim(x) else 'a scalar'
                 for x in jax.tree.leaves(client_data)}
  if len(num_clients) != 1 or 'a scalar' in num_clients:
    raise ValueError('every leaf of client_data needs the same leading '
                     f'(client) axis; got {sorted(num_clients, key=str)}.')
  if state is None:
    state = algorithm.init(params, num_clients.pop(), weights)
  step = jax.jit(lambda p, s, data: algorithm.round(p, s, client_fn, data))
  evaluate = jax.jit(eval_fn) if eval_fn is not None else None
  history = {name: [] for name in RoundInfo._fields}
  if evaluate is not None:
    history['eval'] = []
  for _ in range(rounds):
    params, state, info = step(params, state, client_data)
    for name, value in info._asdict().items():
      history[name].append(np.asarray(value))
    if evaluate is not None:
      history['eval'].append(np.asarray(evaluate(params)))
  return params, state, {k: np.asarray(v) for k, v in history.items()}

