r"""FedZO and its drift-corrected variants (FedProx, SCAFFOLD I and II)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from zojax._src import checks
from zojax._src import federated as fed
from zojax._src.base import key_from_seed

CORRECTIONS = (None, 'fedprox', 'scaffold1', 'scaffold2')


class FedZOState(NamedTuple):
  """State of :func:`zojax.federated.fedzo`.

  Attributes:
    key: PRNG key (folded with the round number, then the client index).
    rounds: rounds done (int32).
    clients: client weights.
    control: ``(N, d)`` SCAFFOLD's client control variates :math:`c_i`
      (zeros for the other corrections).
    queries: cumulative evaluations over all clients (int32).
    dim: ``(d,)`` zeros fixing the flat parameter size (shape only).
  """

  key: jax.Array
  rounds: jax.Array
  clients: fed.Clients
  control: jax.Array
  queries: jax.Array
  dim: jax.Array


def orthonormal_estimate(objective, x: jax.Array, key: jax.Array,
                         num_directions: int, sigma: float):
  r"""FedZO's local estimate with :math:`Q` orthonormal directions.

  .. math::
    g = \frac{1}{Q}\sum_{k=1}^{Q}\frac{f(x + \mu u_k) - f(x)}{\mu}\,u_k,

  :math:`u_1..u_Q` an orthonormalised Gaussian sample (QR), so
  :math:`E[g] \approx \nabla f(x)/d` (the FZooS reference code's scale; with
  Adam as the local optimizer the scale cancels). ``Q + 1`` evaluations in
  one ``vmap``. Returns ``(g, f(x))``; a non-finite difference gives a zero
  estimate.
  """
  gaussian = jax.random.normal(key, (x.shape[0], num_directions), jnp.float32)
  directions = jnp.linalg.qr(gaussian)[0].T               # (Q, d)
  points = jnp.concatenate([x[None], x + sigma * directions])
  values = jax.vmap(objective)(points)
  slopes = (values[1:] - values[0]) / sigma
  estimate = slopes @ directions / num_directions
  finite = jnp.all(jnp.isfinite(values))
  return jnp.where(finite, estimate, 0.0), values[0]


def fedzo(
    local_steps: int,
    *,
    num_directions: int = 20,
    sigma: float = 0.01,
    local_optimizer: Optional[optax.GradientTransformation] = None,
    correction: Optional[str] = None,
    prox: float = 1.0,
    server_lr: float = 1.0,
    seed=0,
    mesh: Optional[jax.sharding.Mesh] = None,
    client_axis: Optional[str] = None,
) -> fed.FederatedAlgorithm:
  r"""FedZO (Fang et al., 2022) with FZooS's baseline corrections.

  Round :math:`r` from the global :math:`x_r`: every client runs
  :math:`T` = ``local_steps`` steps of ``local_optimizer`` (fresh state each
  round; default Adam, lr 0.01, as in the FZooS experiments) on

  .. math::
    \hat g_i(x) = g_i(x) + \text{correction},

  :math:`g_i` the orthonormal finite-difference estimate
  (:func:`orthonormal_estimate`, :math:`Q` = ``num_directions``,
  :math:`\mu` = ``sigma``), and the server averages:
  :math:`x_{r+1} = x_r + \eta_g\sum_i p_i(x_i - x_r)`. ``correction``:

  * ``None``: FedZO.
  * ``'fedprox'``: :math:`+\rho\,(x - x_r)`, :math:`\rho` = ``prox``
    (FedProx's proximal term).
  * ``'scaffold1'``: :math:`+ (c - c_i)`, :math:`c_i` the mean of client
    :math:`i`'s estimates over its previous round's local steps and
    :math:`c = \sum_i p_i c_i` (SCAFFOLD type I; zero in the first round).
  * ``'scaffold2'``: the same with :math:`c_i = g_i(x_r)`, a fresh estimate
    at the round's start (type II; :math:`Q + 1` more evaluations and one
    more exchange of :math:`c_i`, :math:`c` per round).

  Cost per round and client: :math:`T(Q+1)` evaluations (type II:
  :math:`(T+1)(Q+1)`); bytes: :math:`x` down and :math:`x_i` up (4d each),
  SCAFFOLD also :math:`c` down and :math:`c_i` up. The reference code's
  server-side check (keep :math:`x_r` if :math:`F` did not decrease) spends
  two evaluations of :math:`F` that it does not count; zojax does not do
  it.

  Args:
    local_steps: :math:`T`.
    num_directions: :math:`Q` (<= d).
    sigma: :math:`\mu`, the finite-difference step.
    local_optimizer: an optax transform for the local steps.
    correction: ``None``, ``'fedprox'``, ``'scaffold1'`` or ``'scaffold2'``.
    prox: FedProx's :math:`\rho`.
    server_lr: :math:`\eta_g`.
    seed: int seed or PRNG key.
    mesh, client_axis: split the clients over this mesh axis.

  Returns:
    A :class:`zojax.federated.FederatedAlgorithm`.

  References:
    Fang, Yu, Jiang, Shi & Jones, Communication-Efficient Stochastic
    Zeroth-Order Optimization for Federated Learning, IEEE TSP 2022;
    Li et al., Federated Optimization in Heterogeneous Networks (FedProx),
    MLSys 2020; Karimireddy et al., SCAFFOLD, ICML 2020; Shu et al.,
    FZooS, 2024 (the baselines' setup).
  """
  checks.validate_positive_int('local_steps', local_steps)
  checks.validate_positive_int('num_directions', num_directions)
  checks.validate_sigma(sigma)
  checks.validate_choice('correction', correction, CORRECTIONS)
  optimizer = local_optimizer or optax.adam(0.01)
  layout = fed.ClientLayout.create(mesh, client_axis)
  initial_key = key_from_seed(seed)
  scaffold = correction in ('scaffold1', 'scaffold2')
  evals = (local_steps + (correction == 'scaffold2')) * (num_directions + 1)

  def init_fn(params, num_clients, weights=None):
    flat, _ = fed.flatten(params)
    clients = fed.Clients.create(num_clients, weights)
    layout.check(num_clients)
    if num_directions > flat.shape[0]:
      raise ValueError(f'num_directions ({num_directions}) cannot exceed '
                       f'the {flat.shape[0]} parameters.')
    return FedZOState(
        key=initial_key, rounds=jnp.zeros((), jnp.int32), clients=clients,
        control=jnp.zeros((num_clients, flat.shape[0]), jnp.float32),
        queries=jnp.zeros((), jnp.int32),
        dim=jnp.zeros((flat.shape[0],), jnp.float32))

  def round_fn(params, state, client_fn, client_data):
    dim, x, unflatten, objective, keys = fed.start_round(
        'fedzo', params, state, client_fn, client_data, state.dim.shape[0])
    num_clients = state.clients.count
    control = state.control
    if correction == 'scaffold2':
      control, _ = layout.map(
          lambda key, data, x: orthonormal_estimate(
              lambda p: objective(p, data), x, jax.random.fold_in(key, 0),
              num_directions, sigma),
          (keys, client_data), (x,))
    server_control = state.clients.average(control)

    def client(key, data, own_control, x, server_control):
      f = lambda p: objective(p, data)

      def gradient_fn(point, t, total):
        raw, value = orthonormal_estimate(
            f, point, jax.random.fold_in(key, t), num_directions, sigma)
        corrected = raw
        if correction == 'fedprox':
          corrected = raw + prox * (point - x)
        elif scaffold:
          corrected = raw + (server_control - own_control)
        return corrected, total + raw, value

      local, total, values = fed.local_descent(
          optimizer, gradient_fn, x, local_steps, jnp.zeros_like(x))
      return local, total / local_steps, values[0]

    local, mean_estimate, start_values = layout.map(
        client, (keys, client_data, control), (x, server_control))
    new_control = mean_estimate if correction == 'scaffold1' else control
    new_x = fed.server_step(x, state.clients, local, server_lr)
    numbers = dim * (2 if scaffold else 1)
    info = fed.RoundInfo(
        value=state.clients.average(start_values),
        queries=jnp.asarray(num_clients * evals, jnp.int32),
        bytes_up=fed.dense_bytes(num_clients, numbers),
        bytes_down=fed.dense_bytes(num_clients, numbers))
    new_state = state._replace(
        rounds=state.rounds + 1,
        control=new_control if scaffold else state.control,
        queries=state.queries + info.queries)
    return unflatten(new_x), new_state, info

  return fed.FederatedAlgorithm(init_fn, round_fn)
