r"""Federated FZooS: local GP surrogates corrected by a shared RFF surrogate."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from zojax._src import checks
from zojax._src import federated as fed
from zojax._src import surrogate
from zojax._src.base import key_from_seed
from zojax._src.fzoos import validate_surrogate_args

SCHEDULES = ('adaptive', 'constant', 'none')


class FedFZooSState(NamedTuple):
  """State of :func:`zojax.federated.fzoos`.

  Attributes:
    key: PRNG key (folded with the round number, then the client index).
    rounds: rounds done (int32).
    clients: client weights.
    features: the shared random Fourier features (fixed by the seed).
    history: per-client query histories (leading axis :math:`N`).
    radius: ``(N,)`` each client's exploration radius for the next
      surrogate fit, half its last mean absolute local displacement.
    queries: cumulative evaluations over all clients (int32).
  """

  key: jax.Array
  rounds: jax.Array
  clients: fed.Clients
  features: surrogate.FourierFeatures
  history: surrogate.QueryHistory
  radius: jax.Array
  queries: jax.Array


def fzoos(
    local_steps: int,
    *,
    num_features: int = 10_000,
    lengthscale: float = 1.0,
    noise: float = 1e-6,
    history_size: int = 150,
    num_candidates: int = 100,
    num_active: int = 5,
    radius: float = 0.01,
    surrogate_candidates: int = 200,
    surrogate_queries: int = 50,
    correction: str = 'adaptive',
    local_optimizer: Optional[optax.GradientTransformation] = None,
    server_lr: float = 1.0,
    seed=0,
    mesh: Optional[jax.sharding.Mesh] = None,
    client_axis: Optional[str] = None,
) -> fed.FederatedAlgorithm:
  r"""FZooS: federated ZO with trajectory-informed surrogate gradients.

  Each client keeps a history of its queries (:func:`zojax.fzoos`). Round
  :math:`r` from the global :math:`x_r`:

  1. **Shared surrogate.** Client :math:`i` queries :math:`f_i(x_r)` and
     ``surrogate_queries`` active points (of ``surrogate_candidates`` in
     :math:`x_r + U[-\rho_i, \rho_i]^d`, :math:`\rho_i` half its last mean
     absolute local displacement, ``radius`` in the first round), fits
     random-Fourier-feature weights
     :math:`w_i = \Phi^\top(\Phi\Phi^\top + s^2I)^{-1}y` on its history
     (:math:`M` = ``num_features`` features of the SE kernel,
     lengthscale :math:`\ell`) and sends them; the server sends back
     :math:`\bar w = \sum_i p_i w_i`, whose mean :math:`\hat\mu` is a
     surrogate of :math:`F`.
  2. **Local steps.** :math:`T` steps of ``local_optimizer`` (fresh each
     round; default Adam, lr 0.01) on

     .. math::
       \hat g_i(x) = \nabla\mu_i(x) + \gamma_t\big[\nabla\hat\mu(x)
         - \nabla\hat\mu^{(i)}(x)\big],

     :math:`\nabla\mu_i` the gradient of client :math:`i`'s GP posterior
     mean over its history, :math:`\nabla\hat\mu^{(i)}` that of its own RFF
     weights :math:`w_i`, :math:`\gamma_t = 1/t` (``correction=
     'adaptive'``), 1 (``'constant'``) or 0 (``'none'``). After each step the
     client queries the new point and ``num_active`` active points around
     it (:func:`zojax.fzoos`).
  3. **Server.** :math:`x_{r+1} = x_r + \eta_g\sum_i p_i (x_i - x_r)`.

  Cost per round and client: :math:`1 + Q_s + T(1 + a)` evaluations
  (:math:`Q_s` = ``surrogate_queries``, :math:`a` = ``num_active``: 111
  with the defaults and :math:`T` = 10; the reference code spends 107, its
  last step queries no active points); bytes:
  :math:`x_r` and :math:`\bar w` down, :math:`w_i` and :math:`x_i` up
  (:math:`4(d + M)` each way). The features are fixed by ``seed``, known to
  all parties (a seed, sent once, not counted).

  Differences from the reference code, stated: its first round has no
  correction and starts from 10 random queries (here the shared surrogate
  is fitted in every round, the first included); its server keeps
  :math:`x_r` when :math:`F` did not decrease, spending two uncounted
  evaluations of :math:`F` (not done here); the local GP is
  :func:`zojax.fzoos`'s (fixed SE lengthscale, newest ``history_size``
  queries; the reference fits a Matérn kernel on the 150 nearest).

  Reproducibility: the same seed gives the same run on the same devices.
  The GP solves are near-singular (clustered queries), so float rounding
  differences grow over rounds: splitting the clients over devices changes
  the result at the 1e-4 level after one round, and XLA's GPU reductions are
  not bitwise deterministic unless ``XLA_FLAGS=--xla_gpu_deterministic_ops=
  true``.

  Args:
    local_steps: :math:`T`.
    num_features: :math:`M`.
    lengthscale: :math:`\ell` of both kernels (the paper: 1 on inputs
      scaled to [0, 1]).
    noise: :math:`s^2` (on values normalised to [0, 1]).
    history_size, num_candidates, num_active, radius: the local surrogate
      and its active queries (see :func:`zojax.fzoos`).
    surrogate_candidates, surrogate_queries: active queries at
      :math:`x_r` for the shared surrogate.
    correction: ``'adaptive'``, ``'constant'`` or ``'none'``.
    local_optimizer: an optax transform for the local steps.
    server_lr: :math:`\eta_g`.
    seed: int seed or PRNG key.
    mesh, client_axis: split the clients over this mesh axis.

  Returns:
    A :class:`zojax.federated.FederatedAlgorithm`.

  References:
    Shu, Lin, Dai & Low, Federated Zeroth-Order Optimization using
    Trajectory-Informed Surrogate Gradients, 2024 (arXiv:2308.04077);
    Rahimi & Recht, Random Features for Large-Scale Kernel Machines, 2007.
  """
  checks.validate_positive_int('local_steps', local_steps)
  checks.validate_positive_int('num_features', num_features)
  validate_surrogate_args(history_size, num_candidates, num_active, radius,
                          lengthscale, noise)
  validate_surrogate_args(history_size, surrogate_candidates,
                          surrogate_queries, radius, lengthscale, noise)
  checks.validate_choice('correction', correction, SCHEDULES)
  optimizer = local_optimizer or optax.adam(0.01)
  layout = fed.ClientLayout.create(mesh, client_axis)
  initial_key, side_key = jax.random.split(key_from_seed(seed))
  gp = dict(lengthscale=lengthscale, noise=noise)
  evals = 1 + surrogate_queries + local_steps * (1 + num_active)

  def init_fn(params, num_clients, weights=None):
    flat, _ = fed.flatten(params)
    clients = fed.Clients.create(num_clients, weights)
    layout.check(num_clients)
    history = surrogate.QueryHistory.empty(history_size, flat.shape[0])
    return FedFZooSState(
        key=initial_key, rounds=jnp.zeros((), jnp.int32), clients=clients,
        features=surrogate.FourierFeatures.create(
            side_key, num_features,
            flat.shape[0], lengthscale),
        history=jax.tree.map(
            lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape), history),
        radius=jnp.full((num_clients,), radius, jnp.float32),
        queries=jnp.zeros((), jnp.int32))

  def query(f, history, key, centre, candidates, chosen, spread):
    """f at ``centre`` and at ``chosen`` active points around it."""
    points = surrogate.points_to_query(
        key, history, centre, num_candidates=candidates, num_chosen=chosen,
        radius=spread, **gp)
    values = jax.vmap(f)(points)
    return history.add(points, values), values[0]

  def round_fn(params, state, client_fn, client_data):
    dim, x, unflatten, objective, keys = fed.start_round(
        'fzoos', params, state, client_fn, client_data,
        state.history.points.shape[-1])
    num_clients = state.clients.count

    def fit_shared(key, data, history, spread, x, features):
      history, value = query(lambda p: objective(p, data), history,
                             jax.random.fold_in(key, 0), x,
                             surrogate_candidates, surrogate_queries, spread)
      return history, features.fit(history, noise), value

    history, weights, start_values = layout.map(
        fit_shared, (keys, client_data, state.history, state.radius),
        (x, state.features))
    shared = state.clients.average(weights)

    def client(key, data, history, own_weights, x, shared, features):
      f = lambda p: objective(p, data)
      difference = shared - own_weights

      def gradient_fn(point, t, history):
        if correction == 'adaptive':
          gamma = 1.0 / t
        else:
          gamma = 1.0 if correction == 'constant' else 0.0
        gradient = surrogate.posterior_mean_gradient(history, point, **gp)
        gradient = gradient + gamma * features.mean_gradient(difference,
                                                             point)
        gradient = jnp.where(jnp.all(jnp.isfinite(gradient)), gradient, 0.0)
        return gradient, history, ()

      def after_step(point, t, history):
        return query(f, history, jax.random.fold_in(key, t), point,
                     num_candidates, num_active, radius)[0]

      local, history, _ = fed.local_descent(optimizer, gradient_fn, x,
                                            local_steps, history, after_step)
      return local, history

    local, history = layout.map(client,
                                (keys, client_data, history, weights),
                                (x, shared, state.features))
    new_x = fed.server_step(x, state.clients, local, server_lr)
    info = fed.RoundInfo(
        value=state.clients.average(start_values),
        queries=jnp.asarray(num_clients * evals, jnp.int32),
        bytes_up=fed.dense_bytes(num_clients, dim + num_features),
        bytes_down=fed.dense_bytes(num_clients, dim + num_features))
    new_state = state._replace(
        rounds=state.rounds + 1, history=history,
        radius=jnp.mean(jnp.abs(local - new_x[None]), axis=1) / 2,
        queries=state.queries + info.queries)
    return unflatten(new_x), new_state, info

  return fed.FederatedAlgorithm(init_fn, round_fn)
