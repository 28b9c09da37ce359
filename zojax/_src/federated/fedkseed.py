r"""FedKSeed: federated ZO whose messages are (seed index, scalar) pairs."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from zojax._src.core import checks
from zojax._src.core import keys as keys_lib
from zojax._src.core.perturbable import Perturbable
from zojax._src.core.stats import EstimateStats
from zojax._src.federated import protocol as fed
from zojax._src.query import directions as directions_lib
from zojax._src.query import engine

SAMPLINGS = ('uniform', 'importance')
_RECONSTRUCT_CHUNK = 64  # seeds regenerated at once when rebuilding updates


class SeedMessages(NamedTuple):
  """What the clients sent in the last round: one pair per local step.

  Attributes:
    indices: ``(N, T)`` int32 seed indices :math:`j_{i,t}` in ``[0, K)``.
    scalars: ``(N, T)`` float32 projected gradients :math:`g_{i,t}`.
  """

  indices: jax.Array
  scalars: jax.Array


class FedKSeedState(NamedTuple):
  """State of :func:`zojax.federated.fedkseed`.

  Attributes:
    key: PRNG key (folded with the round number, then the client index).
    pool_key: the key the :math:`K` seeds' directions are drawn from.
    clients: client weights.
    amplitude_sum, amplitude_count: ``(K,)`` per-seed history of
      :math:`|\\mathrm{clip}(G_j)|` (sum and count, starting at one 0), for
      ``sampling='importance'``.
    messages: the last round's :class:`SeedMessages`.
    dim: ``(d,)`` zeros fixing the flat parameter size (shape only).
    stats: rounds done, evaluations of all clients, the rounds' values.
  """

  key: jax.Array
  pool_key: jax.Array
  clients: fed.Clients
  amplitude_sum: jax.Array
  amplitude_count: jax.Array
  messages: SeedMessages
  dim: jax.Array
  stats: EstimateStats


def seed_direction(pool_key: jax.Array, index: jax.Array,
                   dim: int) -> jax.Array:
  """:math:`z_j \\sim N(0, I_d)`: direction ``j`` of the pool key, drawn by
  zojax's one generator (:mod:`zojax._src.query.directions`, a flat vector
  with path '')."""
  key = directions_lib.leaf_key(directions_lib.query_key(pool_key, index), '')
  return directions_lib.leaf_normal(key, (dim,))


def seed_probabilities(amplitude_sum: jax.Array, amplitude_count: jax.Array,
                       sampling: str) -> jax.Array:
  r"""Seed sampling probabilities.

  ``'uniform'``: :math:`1/K`. ``'importance'`` (FedKSeed-Pro's
  probability-differentiated sampling): with :math:`a_j` the mean
  :math:`|\mathrm{clip}(G_j)|` over seed :math:`j`'s history,
  :math:`p = \mathrm{softmax}((a - \min a)/(\max a - \min a))`.
  """
  if sampling == 'uniform':
    return jnp.full(amplitude_sum.shape, 1.0 / amplitude_sum.shape[0])
  mean = amplitude_sum / amplitude_count
  spread = jnp.max(mean) - jnp.min(mean)
  return jax.nn.softmax((mean - jnp.min(mean)) / (spread + 1e-10))


def reconstruct(pool_key: jax.Array, indices: jax.Array, scalars: jax.Array,
                dim: int) -> jax.Array:
  r""":math:`\sum_k s_k z_{j_k}` over message pairs :math:`(j_k, s_k)`, a
  weighted sum of regenerated directions through the query engine, 64
  directions at a time (memory :math:`64d`)."""
  indices, scalars = indices.reshape(-1), scalars.reshape(-1)
  space = Perturbable.build(jnp.zeros((dim,), jnp.float32))
  pool = engine.Directions(
      indices.shape[0], lambda k: (seed_direction(pool_key, indices[k], dim),),
      1.0, space)
  (total,) = engine.coefficient_sum(pool, scalars, _RECONSTRUCT_CHUNK)
  return total


def fedkseed(
    local_steps: int,
    *,
    learning_rate: float = 1e-3,
    num_seeds: int = 4096,
    sigma: float = 5e-3,
    sampling: str = 'uniform',
    amplitude_clip: float = 0.5,
    seed=0,
    mesh: Optional[jax.sharding.Mesh] = None,
    client_axis: Optional[str] = None,
) -> fed.FederatedAlgorithm:
  r"""FedKSeed (Qin et al., ICML 2024): ZO-SGD whose updates travel as seeds.

  A pool of :math:`K` = ``num_seeds`` seeds defines directions
  :math:`z_1..z_K \sim N(0, I_d)` that every party can regenerate. In a
  round from :math:`x_r`, client :math:`i` takes :math:`T` local steps:
  draw a seed index :math:`j \sim p`, then

  .. math::
    g = \frac{f_i(x + \epsilon z_j) - f_i(x - \epsilon z_j)}{2\epsilon},
    \qquad x \leftarrow x - \eta\, g\, z_j,

  and sends the :math:`T` pairs :math:`(j, g)`. Since every local update is
  :math:`-\eta\sum_t g_t z_{j_t}`, the FedAvg average of the clients'
  models is exactly

  .. math::
    x_{r+1} = x_r - \eta\sum_{j} G_j z_j,\qquad
    G_j = \sum_i p_i \sum_{t: j_{i,t} = j} g_{i,t},

  which the server and every client rebuild from the aggregated
  :math:`(j, G_j)`: no model is ever sent. (The simulated server sums the
  received pairs weighted by :math:`p_i`, :func:`reconstruct`, the same
  sum.)

  Bytes per round: each client sends :math:`8T` (an int32 index and a
  float32 scalar per step); each receives the nonzero :math:`(j, G_j)`
  pairs, :math:`8\cdot\#\{j: G_j \ne 0\}`, or all :math:`K` scalars
  (:math:`4K`) when that is smaller. The dense baseline moves :math:`4d`
  each way. Evaluations: :math:`2T` per client per round.

  ``sampling='importance'`` is FedKSeed-Pro's probability-differentiated
  sampling (:func:`seed_probabilities`), computed from the aggregated
  :math:`G_j` that every client receives, so clients and server agree
  without extra bytes. A non-finite :math:`g` is sent as 0 (that step does
  not move).

  Args:
    local_steps: :math:`T`.
    learning_rate: :math:`\eta`.
    num_seeds: :math:`K` (>= 1).
    sigma: :math:`\epsilon`.
    sampling: ``'uniform'`` or ``'importance'``.
    amplitude_clip: clip of :math:`G_j` in the amplitude history.
    seed: an integer or a PRNG key (the pool and the clients' draws).
    mesh, client_axis: split the clients over this mesh axis.

  Returns:
    A :class:`zojax.federated.FederatedAlgorithm`; its state's
    ``messages`` hold the last round's pairs.

  References:
    Qin, Chen, Yao, Ding, Li & Deng, Federated Full-Parameter Tuning of
    Billion-Sized Language Models with Communication Cost under 18
    Kilobytes, ICML 2024.
  """
  checks.validate_positive_int('local_steps', local_steps)
  if isinstance(num_seeds, bool) or not isinstance(num_seeds, int) or (
      num_seeds < 1):
    raise ValueError(f'num_seeds (K) must be an integer >= 1, got '
                     f'{num_seeds!r}.')
  checks.validate_sigma(sigma)
  checks.validate_choice('sampling', sampling, SAMPLINGS)
  checks.validate_positive_float('learning_rate', learning_rate,
                                 allow_schedule=False)
  keys_lib.check_seed(seed)
  local_steps, num_seeds = int(local_steps), int(num_seeds)
  layout = fed.ClientLayout.create(mesh, client_axis)

  def init_fn(params, num_clients, weights=None):
    flat, _ = fed.flatten(params)
    clients = fed.Clients.create(num_clients, weights)
    layout.check(num_clients)
    empty = jnp.zeros((num_clients, local_steps), jnp.int32)
    key, pool_key = keys_lib.split(keys_lib.key_data(seed))
    return FedKSeedState(
        key=key, pool_key=pool_key, clients=clients,
        amplitude_sum=jnp.zeros((num_seeds,), jnp.float32),
        amplitude_count=jnp.ones((num_seeds,), jnp.float32),
        messages=SeedMessages(empty, empty.astype(jnp.float32)),
        dim=jnp.zeros((flat.shape[0],), jnp.float32),
        stats=EstimateStats.create(num_clients * 2 * local_steps))

  def round_fn(params, state, client_fn, client_data):
    dim, x, unflatten, objective, keys = fed.start_round(
        'fedkseed', params, state, client_fn, client_data, state.dim.shape[0])
    num_clients = state.clients.count
    logits = jnp.log(seed_probabilities(state.amplitude_sum,
                                        state.amplitude_count, sampling))

    def client(key, data, x, logits, pool_key):
      f = lambda p: objective(p, data)

      def local_step(point, t):
        index = jax.random.categorical(keys_lib.typed(keys_lib.fold_in(key, t)),
                                       logits)
        z = seed_direction(pool_key, index, dim)
        plus, minus = f(point + sigma * z), f(point - sigma * z)
        scalar = (plus - minus) / (2 * sigma)
        scalar = jnp.where(jnp.isfinite(scalar), scalar, 0.0)
        return point - learning_rate * scalar * z, (index, scalar,
                                                    (plus + minus) / 2)

      _, (indices, scalars, values) = jax.lax.scan(
          local_step, x, jnp.arange(local_steps))
      return indices, scalars, values[0]

    indices, scalars, start_values = layout.map(
        client, (keys, client_data), (x, logits, state.pool_key))
    weighted = state.clients.weights[:, None] * scalars
    new_x = x - learning_rate * reconstruct(state.pool_key, indices,
                                            weighted, dim)
    aggregated = jax.ops.segment_sum(weighted.reshape(-1),
                                     indices.reshape(-1), num_seeds)
    used = jax.ops.segment_sum(jnp.ones(indices.size, jnp.int32),
                               indices.reshape(-1), num_seeds) > 0
    pairs_down = jnp.minimum(8 * jnp.sum(aggregated != 0),
                             fed.BYTES_PER_NUMBER * num_seeds)
    info = fed.RoundInfo(
        value=state.clients.average(start_values),
        queries=jnp.asarray(num_clients * 2 * local_steps, jnp.int32),
        bytes_up=jnp.asarray(num_clients * 8 * local_steps, jnp.int32),
        bytes_down=(num_clients * pairs_down).astype(jnp.int32))
    clipped = jnp.abs(jnp.clip(aggregated, -amplitude_clip, amplitude_clip))
    new_state = state._replace(
        amplitude_sum=state.amplitude_sum + jnp.where(used, clipped, 0.0),
        amplitude_count=state.amplitude_count + used,
        messages=SeedMessages(indices, scalars),
        stats=state.stats.record(info.value, jnp.isfinite(info.value)))
    return unflatten(new_x), new_state, info

  return fed.FederatedAlgorithm(init_fn, round_fn)
