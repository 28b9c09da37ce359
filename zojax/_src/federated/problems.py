r"""The FZooS paper's synthetic federated problem."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

_BOX = 10.0  # the functions live on [-10, 10]^d, reached from x in [0, 1]^d


class FederatedProblem(NamedTuple):
  """A federated test problem.

  Attributes:
    client_fn: ``client_fn(x, data_i) -> scalar``.
    client_data: per-client data, leading axis :math:`N`.
    start: the starting point :math:`x_0`.
    optimum: :math:`\\min_x F(x)` for uniform client weights.
  """

  client_fn: Callable[[jax.Array, Any], jax.Array]
  client_data: Any
  start: jax.Array
  optimum: float

  def global_fn(self, x: jax.Array) -> jax.Array:
    """:math:`F(x) = \\frac1N\\sum_i f_i(x)` (the experimenter's measure)."""
    return jnp.mean(jax.vmap(lambda data: self.client_fn(x, data))(
        self.client_data))


def heterogeneous_quadratic(key: jax.Array, *, num_clients: int = 5,
                            dim: int = 300,
                            heterogeneity: float = 1.0) -> FederatedProblem:
  r"""FZooS's synthetic quadratic clients (Shu et al., 2024, Sec. 6.1).

  .. math::
    f_i(x) = \frac{1}{10d}\Big(\sum_{j=1}^d \big[(1 + C(a_{ij} - \tfrac1N))
      z_j^2 + (1 + C(b_{ij} - \tfrac1N)) z_j\big] + 1\Big),\quad
    z = 20\,\mathrm{clip}(x, 0, 1) - 10,

  with :math:`a_{\cdot j}, b_{\cdot j} \sim \mathrm{Dirichlet}(1/N)` over
  the clients, so :math:`\sum_i a_{ij} = 1` and the global objective
  :math:`F = \frac1N\sum_i f_i = \frac{1}{10d}(\sum_j z_j^2 + z_j + 1)` does
  not depend on the heterogeneity :math:`C`; its minimum is
  :math:`\frac{1}{10d}(1 - d/4)` at :math:`z_j = -1/2`. For :math:`C > N`
  some local coefficients are negative (non-convex clients). :math:`x_0
  \sim U[0, 1]^d`.
  """
  dirichlet_a, dirichlet_b, start_key = jax.random.split(key, 3)
  alpha = jnp.full((num_clients,), 1.0 / num_clients)
  shares = lambda k: jax.random.dirichlet(k, alpha, (dim,)).T  # (N, d)
  data = {
      'quadratic': 1 + heterogeneity * (shares(dirichlet_a) - 1 / num_clients),
      'linear': 1 + heterogeneity * (shares(dirichlet_b) - 1 / num_clients),
  }

  def client_fn(x, client):
    z = 2 * _BOX * jnp.clip(x, 0.0, 1.0) - _BOX
    return (jnp.dot(client['quadratic'], z**2)
            + jnp.dot(client['linear'], z) + 1) / (10 * dim)

  return FederatedProblem(
      client_fn=client_fn, client_data=data,
      start=jax.random.uniform(start_key, (dim,), jnp.float32),
      optimum=(1 - dim / 4) / (10 * dim))
