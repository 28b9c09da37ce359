r"""Gaussian-process surrogates of a black-box function and their gradients.

The pieces of FZooS (Shu et al., 2024) that do not depend on who queries:

* :class:`QueryHistory`, a fixed-size ring buffer of queried points and values
  (jit-able: the newest ``size`` queries, older ones overwritten);
* :func:`posterior_mean_gradient`, the gradient of the GP posterior mean
  under a squared-exponential (SE) kernel
  :math:`k(x, x') = \exp(-\|x - x'\|^2 / 2\ell^2)`,

  .. math::
    \nabla\mu(x) = \partial k(x, X)^\top (K + s^2 I)^{-1} y
      = \frac{1}{\ell^2} \sum_j \alpha_j\, k(x, x_j)\,(x_j - x),\qquad
    \alpha = (K + s^2 I)^{-1} y;

* :func:`gradient_variance`, the trace of the posterior covariance of
  :math:`\nabla f` at candidate points, used to choose the next queries
  (active queries: the candidates whose gradient is most uncertain);
* :class:`FourierFeatures`, random Fourier features
  :math:`\phi(x) = \sqrt{2/M}\cos(Vx + b)`, :math:`V \sim N(0, I/\ell^2)`,
  :math:`b \sim U[0, 2\pi]`, with :math:`\phi(x)^\top\phi(x') \approx k(x,
  x')` (Rahimi & Recht, 2007): a GP mean becomes a weight vector
  :math:`w = \Phi^\top(\Phi\Phi^\top + s^2 I)^{-1} y` of length :math:`M`
  that clients can send and a server can average, with gradient
  :math:`\nabla\hat\mu(x) = -\sqrt{2/M}\, V^\top(\sin(Vx + b) \odot w)`.

Values are min-max normalised over the history before fitting (the FZooS
reference code does the same) and the gradients scaled back, so the surrogate
does not depend on the objective's units. Non-finite values are never stored.

Everything is float32 and works on flat vectors :math:`x \in R^d`. Distances
are computed after centring the history at the point of interest, so
clustered points (a trajectory, queries within 0.01 of each other) keep their
small differences in float32. The linear systems are solved through an
eigendecomposition with eigenvalues clipped at :math:`s^2`, which stays finite
when :math:`K` is numerically singular (clustered points, large lengthscale).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class QueryHistory(NamedTuple):
  """The newest ``size`` queries of a function, in a ring buffer.

  Attributes:
    points: ``(size, d)`` float32 queried points.
    values: ``(size,)`` float32 values.
    valid: ``(size,)`` bool, which slots hold a (finite) query.
    position: int32 slot the next query is written to.
  """

  points: jax.Array
  values: jax.Array
  valid: jax.Array
  position: jax.Array

  @classmethod
  def empty(cls, size: int, dim: int) -> 'QueryHistory':
    return cls(points=jnp.zeros((size, dim), jnp.float32),
               values=jnp.zeros((size,), jnp.float32),
               valid=jnp.zeros((size,), bool),
               position=jnp.zeros((), jnp.int32))

  def add(self, points: jax.Array, values: jax.Array) -> 'QueryHistory':
    """Appends ``(n, d)`` points and ``(n,)`` values; non-finite ones are
    written as empty slots."""
    size = self.values.shape[0]
    count = values.shape[0]
    slots = (self.position + jnp.arange(count)) % size
    finite = jnp.isfinite(values)
    return QueryHistory(
        points=self.points.at[slots].set(points.astype(jnp.float32)),
        values=self.values.at[slots].set(
            jnp.where(finite, values, 0.0).astype(jnp.float32)),
        valid=self.valid.at[slots].set(finite),
        position=(self.position + count) % size)


class _Fit(NamedTuple):
  """The GP fitted around a centre ``x``: what every query at ``x`` needs."""

  offsets: jax.Array      # (H, d) history points minus the centre
  gram: jax.Array         # (H, H) their inner products
  sq_norms: jax.Array     # (H,) squared norms of the offsets
  inverse: jax.Array      # (H, H) (K + s^2 I)^-1 on valid slots
  weights: jax.Array      # (H,) alpha = (K + s^2 I)^-1 y (normalised y)
  scale: jax.Array        # value range the normalised y is scaled back by


def _normalised_values(history: QueryHistory):
  """Min-max normalised values (0 on empty slots) and the range."""
  lo = jnp.min(jnp.where(history.valid, history.values, jnp.inf))
  hi = jnp.max(jnp.where(history.valid, history.values, -jnp.inf))
  scale = jnp.where(hi > lo, hi - lo, 1.0)
  lo = jnp.where(jnp.isfinite(lo), lo, 0.0)
  y = jnp.where(history.valid, (history.values - lo) / scale, 0.0)
  return y, scale


def _masked_solve_matrix(kernel: jax.Array, valid: jax.Array,
                         noise: float) -> jax.Array:
  """``(K + s^2 I)^-1`` restricted to the valid slots (identity elsewhere)."""
  both = valid[:, None] & valid[None, :]
  matrix = jnp.where(both, kernel, 0.0) + jnp.diag(
      jnp.where(valid, noise, 1.0))
  eigenvalues, vectors = jnp.linalg.eigh(matrix)
  eigenvalues = jnp.maximum(eigenvalues, noise)
  return (vectors / eigenvalues) @ vectors.T


def fit(history: QueryHistory, centre: jax.Array, lengthscale: float,
        noise: float) -> _Fit:
  """Fits the SE-kernel GP to the history, centred at ``centre``."""
  offsets = jnp.where(history.valid[:, None], history.points - centre, 0.0)
  gram = offsets @ offsets.T
  sq_norms = jnp.diag(gram)
  sq_dists = jnp.maximum(sq_norms[:, None] + sq_norms[None, :] - 2 * gram, 0.)
  kernel = jnp.exp(-sq_dists / (2 * lengthscale**2))
  inverse = _masked_solve_matrix(kernel, history.valid, noise)
  y, scale = _normalised_values(history)
  return _Fit(offsets=offsets, gram=gram, sq_norms=sq_norms, inverse=inverse,
              weights=inverse @ y, scale=scale)


def posterior_mean_gradient(history: QueryHistory, x: jax.Array, *,
                            lengthscale: float, noise: float) -> jax.Array:
  r""":math:`\nabla\mu(x)` of the SE-kernel GP fitted to ``history``.

  Zero when the history is empty. Cost :math:`O(H^2 d + H^3)` for a history
  of :math:`H` points in :math:`d` dimensions.
  """
  f = fit(history, x, lengthscale, noise)
  k = jnp.where(history.valid, jnp.exp(-f.sq_norms / (2 * lengthscale**2)),
                0.0)
  return f.scale * (f.offsets.T @ (f.weights * k)) / lengthscale**2


def gradient_variance(history: QueryHistory, x: jax.Array,
                      candidates: jax.Array, *, lengthscale: float,
                      noise: float) -> jax.Array:
  r"""Trace of the posterior covariance of :math:`\nabla f` at candidates.

  For a candidate :math:`c` and :math:`k_j = k(c, x_j)`,

  .. math::
    \operatorname{tr}\operatorname{Cov}[\nabla f(c)] = \frac{d}{\ell^2}
      - \frac{1}{\ell^4}\sum_{j,m} k_j k_m (x_j - c)^\top(x_m - c)\,
        [(K + s^2 I)^{-1}]_{jm},

  evaluated with offsets from ``x`` (the candidates are ``x`` + small
  steps), in :math:`O(H^2)` per candidate after an :math:`O(H^2 d)` fit.
  The FZooS reference code scores the first coordinate's variance only; the
  trace scores every direction.

  Args:
    history: the queries so far.
    x: the centre, ``(d,)``.
    candidates: ``(C, d)`` points near ``x``.
    lengthscale, noise: the kernel's :math:`\ell` and :math:`s^2`.

  Returns:
    ``(C,)`` variances (unnormalised values: a ranking, not a scale).
  """
  f = fit(history, x, lengthscale, noise)
  steps = candidates - x                                    # (C, d)
  cross = f.offsets @ steps.T                               # (H, C)
  step_sq = jnp.sum(steps * steps, axis=1)                  # (C,)
  sq_dists = jnp.maximum(f.sq_norms[:, None] - 2 * cross + step_sq[None], 0.)
  k = jnp.where(history.valid[:, None],
                jnp.exp(-sq_dists / (2 * lengthscale**2)), 0.0)  # (H, C)
  solved = f.inverse @ k                                    # (H, C)
  quad_gram = jnp.sum(k * ((f.inverse * f.gram) @ k), axis=0)
  quad_cross = jnp.sum((k * cross) * solved, axis=0)
  quad_plain = jnp.sum(k * solved, axis=0)
  explained = quad_gram - 2 * quad_cross + step_sq * quad_plain
  dim = x.shape[0]
  return dim / lengthscale**2 - explained / lengthscale**4


class FourierFeatures(NamedTuple):
  r"""Random Fourier features of the SE kernel with lengthscale :math:`\ell`.

  Attributes:
    frequencies: ``(M, d)`` :math:`V`, entries :math:`N(0, 1/\ell^2)`.
    phases: ``(M,)`` :math:`b \sim U[0, 2\pi]`.
  """

  frequencies: jax.Array
  phases: jax.Array

  @classmethod
  def create(cls, key: jax.Array, num_features: int, dim: int,
             lengthscale: float) -> 'FourierFeatures':
    freq_key, phase_key = jax.random.split(key)
    return cls(
        frequencies=jax.random.normal(freq_key, (num_features, dim),
                                      jnp.float32) / lengthscale,
        phases=jax.random.uniform(phase_key, (num_features,), jnp.float32,
                                  0.0, 2 * jnp.pi))

  def __call__(self, points: jax.Array) -> jax.Array:
    """:math:`\\phi` of ``(n, d)`` points: ``(n, M)``."""
    num = self.phases.shape[0]
    return jnp.sqrt(2.0 / num) * jnp.cos(points @ self.frequencies.T
                                         + self.phases)

  def fit(self, history: QueryHistory, noise: float) -> jax.Array:
    r"""Weights :math:`w = r\,\Phi^\top(\Phi\Phi^\top + s^2I)^{-1}\hat y`.

    :math:`\hat y` are the min-max normalised values and :math:`r` their
    range, so :math:`\phi(x)^\top w` is the posterior mean in the original
    units up to a constant (which no gradient sees).
    """
    phi = jnp.where(history.valid[:, None], self(history.points), 0.0)
    inverse = _masked_solve_matrix(phi @ phi.T, history.valid, noise)
    y, scale = _normalised_values(history)
    return scale * (phi.T @ (inverse @ y))

  def mean_gradient(self, weights: jax.Array, x: jax.Array) -> jax.Array:
    r""":math:`\nabla(\phi(x)^\top w) = -\sqrt{2/M}\,V^\top(\sin(Vx+b)\odot
    w)`."""
    num = self.phases.shape[0]
    sines = jnp.sin(self.frequencies @ x + self.phases)
    return -jnp.sqrt(2.0 / num) * (self.frequencies.T @ (sines * weights))


def active_queries(key: jax.Array, history: QueryHistory, x: jax.Array, *,
                   num_candidates: int, num_chosen: int, radius,
                   lengthscale: float, noise: float) -> jax.Array:
  r"""FZooS's active queries: of ``num_candidates`` points
  :math:`x + \delta`, :math:`\delta \sim U[-r, r]^d`, the ``num_chosen``
  with the largest :func:`gradient_variance`. Returns ``(num_chosen, d)``."""
  steps = jax.random.uniform(key, (num_candidates, x.shape[0]), jnp.float32,
                             -1.0, 1.0) * radius
  candidates = x + steps
  scores = gradient_variance(history, x, candidates, lengthscale=lengthscale,
                             noise=noise)
  _, chosen = jax.lax.top_k(scores, num_chosen)
  return candidates[chosen]


def points_to_query(key: jax.Array, history: QueryHistory, x: jax.Array, *,
                    num_candidates: int, num_chosen: int, radius,
                    lengthscale: float, noise: float) -> jax.Array:
  """``x`` and its :func:`active_queries`, chosen knowing that ``x`` itself
  is queried too: ``(1 + num_chosen, d)``."""
  with_x = history.add(x[None], jnp.zeros((1,), jnp.float32))  # y unused
  chosen = active_queries(key, with_x, x, num_candidates=num_candidates,
                          num_chosen=num_chosen, radius=radius,
                          lengthscale=lengthscale, noise=noise)
  return jnp.concatenate([x[None], chosen])
