r"""FedZO and its drift-corrected variants (FedProx, SCAFFOLD I and II)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from zojax._src.core import checks
from zojax._src.core import keys as keys_lib
from zojax._src.core.perturbable import Perturbable
from zojax._src.core.stats import EstimateStats
from zojax._src.federated import protocol as fed
from zojax._src.query import directions as directions_lib
from zojax._src.query import engine
from zojax._src.query import probes

CORRECTIONS = (None, 'fedprox', 'scaffold1', 'scaffold2')


class FedZOState(NamedTuple):
  """State of :func:`zojax.federated.fedzo`.

  Attributes:
    key: PRNG key (folded with the round number, then the client index).
    clients: client weights.
    control: ``(N, d)`` SCAFFOLD's client control variates :math:`c_i`
      (zeros for the other corrections); also fixes the flat size ``d``.
    stats: rounds done, evaluations of all clients, the rounds' values.
  """

  key: jax.Array
  clients: fed.Clients
  control: jax.Array
  stats: EstimateStats


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
  gaussian = jax.random.normal(keys_lib.typed(key),
                               (x.shape[0], num_directions), jnp.float32)
  space = Perturbable.build(x)
  directions = directions_lib.matrix_directions(
      jnp.linalg.qr(gaussian)[0].T, space, scale=1.0 / num_directions)
  base = objective(x)
  probe = probes.finite_difference(objective, space, difference='forward',
                                   sigma=sigma, base=base)
  (total,), values = engine.weighted_direction_sum(directions, probe, None)
  finite = jnp.all(jnp.isfinite(values)) & jnp.isfinite(base)
  return jnp.where(finite, directions.scale * total, 0.0), base


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
    seed: an integer or a PRNG key.
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
  keys_lib.check_seed(seed)
  local_steps, num_directions = int(local_steps), int(num_directions)
  optimizer = local_optimizer or optax.adam(0.01)
  layout = fed.ClientLayout.create(mesh, client_axis)
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
        key=keys_lib.key_data(seed), clients=clients,
        control=jnp.zeros((num_clients, flat.shape[0]), jnp.float32),
        stats=EstimateStats.create(num_clients * evals))

  def round_fn(params, state, client_fn, client_data):
    dim, x, unflatten, objective, keys = fed.start_round(
        'fedzo', params, state, client_fn, client_data,
        state.control.shape[1])
    num_clients = state.clients.count
    control = state.control
    if correction == 'scaffold2':
      control, _ = layout.map(
          lambda key, data, x: orthonormal_estimate(
              lambda p: objective(p, data), x, keys_lib.fold_in(key, 0),
              num_directions, sigma),
          (keys, client_data), (x,))
    server_control = state.clients.average(control)

    def client(key, data, own_control, x, server_control):
      f = lambda p: objective(p, data)

      def gradient_fn(point, t, total):
        raw, value = orthonormal_estimate(
            f, point, keys_lib.fold_in(key, t), num_directions, sigma)
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
        control=new_control if scaffold else state.control,
        stats=state.stats.record(info.value, jnp.isfinite(info.value)))
    return unflatten(new_x), new_state, info

  return fed.FederatedAlgorithm(init_fn, round_fn)
