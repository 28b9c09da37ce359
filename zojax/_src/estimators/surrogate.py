r"""Gaussian-process surrogates of a black-box function and their gradients.

The pieces of FZooS (Shu et al., 2024) that do not depend on who queries:

* :class:`QueryHistory`, a fixed-size ring buffer of queried points and values
  (jit-able: the newest ``size`` queries, older ones overwritten), and
  :meth:`QueryHistory.nearest`, the queries nearest to a point;
* :func:`posterior_mean_gradient`, the gradient of the GP posterior mean
  under a kernel of :mod:`kernels` (Matérn-5/2 or squared exponential, with
  :math:`\nabla_x k(x, x_j) = w(r_j)(x_j - x)`),

  .. math::
    \nabla\mu(x) = \partial k(x, X)^\top (K + s^2 I)^{-1} y
      = \sum_j \alpha_j\, w(\|x - x_j\|)\,(x_j - x),\qquad
    \alpha = (K + s^2 I)^{-1} y;

* :func:`gradient_variance`, the trace of the posterior covariance of
  :math:`\nabla f` at candidate points, used to choose the next queries
  (active queries: the candidates whose gradient is most uncertain);
* :class:`FourierFeatures`, random Fourier features
  :math:`\phi(x) = \sqrt{2/M}\cos(Vx + b)`, :math:`b \sim U[0, 2\pi]`, with
  :math:`\phi(x)^\top\phi(x') \approx k(x, x')` (Rahimi & Recht, 2007): a GP
  mean becomes a weight vector
  :math:`w = \Phi^\top(\Phi\Phi^\top + s^2 I)^{-1} y` of length :math:`M`
  that clients can send and a server can average, with gradient
  :math:`\nabla\hat\mu(x) = -\sqrt{2/M}\, V^\top(\sin(Vx + b) \odot w)`;
* :class:`LocalGP`, how a client fits its surrogate at a point (kernel,
  fixed or maximum-likelihood lengthscale, all stored or the nearest
  queries) and chooses its active queries.

Values are min-max normalised over the fitted queries (the FZooS reference
code does the same) and the gradients scaled back, so the surrogate does not
depend on the objective's units. Non-finite values are never stored.

Everything is float32 and works on flat vectors :math:`x \in R^d`. Distances
are computed after centring the history at the point of interest, so
clustered points (a trajectory, queries within 0.01 of each other) keep their
small differences in float32. The linear systems are solved through an
eigendecomposition with eigenvalues clipped at :math:`s^2`, which stays finite
when :math:`K` is numerically singular (clustered points, large lengthscale);
the maximum-likelihood fit uses cheaper Cholesky factorisations, where a
failure only rules that lengthscale out.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from zojax._src.core import keys
from zojax._src.estimators import kernels


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

  def nearest(self, centre: jax.Array, count: int) -> 'QueryHistory':
    """The ``count`` stored queries nearest to ``centre`` (Euclidean), as a
    ``count``-slot history (empty slots last when fewer are stored;
    ``position`` 0): :math:`O(Hd)` for the distances, then ``lax.top_k``.
    """
    sq_dists = jnp.sum((self.points - centre) ** 2, axis=1)
    _, index = jax.lax.top_k(jnp.where(self.valid, -sq_dists, -jnp.inf),
                             count)
    return QueryHistory(points=self.points[index], values=self.values[index],
                        valid=self.valid[index],
                        position=jnp.zeros((), jnp.int32))


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


def _geometry(history: QueryHistory, centre: jax.Array):
  """Offsets from ``centre`` (0 on empty slots), their Gram matrix, squared
  norms and the pairwise squared distances."""
  offsets = jnp.where(history.valid[:, None], history.points - centre, 0.0)
  gram = offsets @ offsets.T
  sq_norms = jnp.diag(gram)
  sq_dists = jnp.maximum(sq_norms[:, None] + sq_norms[None, :] - 2 * gram, 0.)
  return offsets, gram, sq_norms, sq_dists


def fit(history: QueryHistory, centre: jax.Array, *, kernel: str,
        lengthscale, noise: float) -> _Fit:
  """Fits the GP to the history, centred at ``centre``."""
  offsets, gram, sq_norms, sq_dists = _geometry(history, centre)
  inverse = _masked_solve_matrix(
      kernels.value(kernel, sq_dists, lengthscale), history.valid, noise)
  y, scale = _normalised_values(history)
  return _Fit(offsets=offsets, gram=gram, sq_norms=sq_norms, inverse=inverse,
              weights=inverse @ y, scale=scale)


def ml_lengthscale(key: jax.Array, history: QueryHistory, centre: jax.Array,
                   *, kernel: str, noise: float, init, restarts: int,
                   steps: int) -> jax.Array:
  """The maximum-likelihood lengthscale of the GP on ``history``
  (:func:`kernels.fit_lengthscale` on its normalised values)."""
  sq_dists = _geometry(history, centre)[3]
  y, _ = _normalised_values(history)
  return kernels.fit_lengthscale(key, kernel, sq_dists, y, history.valid,
                                 noise=noise, init=init, restarts=restarts,
                                 steps=steps)


def posterior_mean_gradient(history: QueryHistory, x: jax.Array, *,
                            kernel: str, lengthscale,
                            noise: float) -> jax.Array:
  r""":math:`\nabla\mu(x) = \sum_j \alpha_j w(r_j)(x_j - x)` of the GP
  fitted to ``history`` (module doc; :math:`w` of :mod:`kernels`).

  Zero when the history is empty. Cost :math:`O(H^2 d + H^3)` for a history
  of :math:`H` points in :math:`d` dimensions.
  """
  f = fit(history, x, kernel=kernel, lengthscale=lengthscale, noise=noise)
  w = jnp.where(history.valid,
                kernels.gradient_weight(kernel, f.sq_norms, lengthscale), 0.0)
  return f.scale * (f.offsets.T @ (f.weights * w))


def gradient_variance(history: QueryHistory, x: jax.Array,
                      candidates: jax.Array, *, kernel: str, lengthscale,
                      noise: float) -> jax.Array:
  r"""Trace of the posterior covariance of :math:`\nabla f` at candidates.

  For a candidate :math:`c`, :math:`w_j = w(\|c - x_j\|)` (so that
  :math:`\operatorname{Cov}[\nabla f(c), f(x_j)] = w_j(x_j - c)`) and the
  prior variance :math:`w(0)` of each partial derivative (:mod:`kernels`),

  .. math::
    \operatorname{tr}\operatorname{Cov}[\nabla f(c)] = d\,w(0)
      - \sum_{j,m} w_j w_m (x_j - c)^\top(x_m - c)\,
        [(K + s^2 I)^{-1}]_{jm},

  evaluated with offsets from ``x`` (the candidates are ``x`` + small
  steps), in :math:`O(H^2)` per candidate after an :math:`O(H^2 d)` fit.
  The FZooS reference code scores the first coordinate's variance only
  (under an SE kernel with the fitted Matérn lengthscale); the trace scores
  every direction.

  Args:
    history: the queries so far.
    x: the centre, ``(d,)``.
    candidates: ``(C, d)`` points near ``x``.
    kernel, lengthscale, noise: the GP's kernel, :math:`\ell` and
      :math:`s^2`.

  Returns:
    ``(C,)`` variances (unnormalised values: a ranking, not a scale).
  """
  f = fit(history, x, kernel=kernel, lengthscale=lengthscale, noise=noise)
  steps = candidates - x                                    # (C, d)
  cross = f.offsets @ steps.T                               # (H, C)
  step_sq = jnp.sum(steps * steps, axis=1)                  # (C,)
  sq_dists = jnp.maximum(f.sq_norms[:, None] - 2 * cross + step_sq[None], 0.)
  w = jnp.where(history.valid[:, None],
                kernels.gradient_weight(kernel, sq_dists, lengthscale),
                0.0)                                        # (H, C)
  solved = f.inverse @ w                                    # (H, C)
  quad_gram = jnp.sum(w * ((f.inverse * f.gram) @ w), axis=0)
  quad_cross = jnp.sum((w * cross) * solved, axis=0)
  quad_plain = jnp.sum(w * solved, axis=0)
  explained = quad_gram - 2 * quad_cross + step_sq * quad_plain
  prior = x.shape[0] * kernels.derivative_variance(kernel, lengthscale)
  return prior - explained


class FourierFeatures(NamedTuple):
  r"""Random Fourier features of a kernel with lengthscale :math:`\ell`.

  By Bochner's theorem :math:`k(x - x') = E_v[\cos(v^\top(x - x'))]` for
  :math:`v` drawn from the kernel's spectral density: :math:`N(0,
  I/\ell^2)` for the SE kernel; for Matérn-5/2 (:math:`\sqrt5 r/\ell`
  scaling) a multivariate Student-t with 5 degrees of freedom and scale
  :math:`1/\ell`, drawn as :math:`v = g\sqrt{5/u}`, :math:`g \sim N(0,
  I/\ell^2)`, :math:`u \sim \chi^2_5` (Rasmussen & Williams, eq. 4.15).

  Attributes:
    frequencies: ``(M, d)`` :math:`V`, rows drawn as above.
    phases: ``(M,)`` :math:`b \sim U[0, 2\pi]`.
  """

  frequencies: jax.Array
  phases: jax.Array

  @classmethod
  def create(cls, key: jax.Array, num_features: int, dim: int,
             lengthscale: float, kernel: str = 'se') -> 'FourierFeatures':
    freq_key, phase_key = jax.random.split(keys.typed(key))
    frequencies = jax.random.normal(freq_key, (num_features, dim),
                                    jnp.float32) / lengthscale
    if kernel == 'matern52':
      chi2 = 2.0 * jax.random.gamma(jax.random.fold_in(freq_key, 1), 2.5,
                                    (num_features, 1), jnp.float32)
      frequencies = frequencies * jnp.sqrt(5.0 / chi2)
    return cls(
        frequencies=frequencies,
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
                   num_candidates: int, num_chosen: int, radius, kernel: str,
                   lengthscale, noise: float) -> jax.Array:
  r"""FZooS's active queries: of ``num_candidates`` points
  :math:`x + \delta`, :math:`\delta \sim U[-r, r]^d`, the ``num_chosen``
  with the largest :func:`gradient_variance`. Returns ``(num_chosen, d)``."""
  steps = jax.random.uniform(keys.typed(key), (num_candidates, x.shape[0]),
                             jnp.float32, -1.0, 1.0) * radius
  candidates = x + steps
  scores = gradient_variance(history, x, candidates, kernel=kernel,
                             lengthscale=lengthscale, noise=noise)
  _, chosen = jax.lax.top_k(scores, num_chosen)
  return candidates[chosen]


class LocalGP(NamedTuple):
  r"""How a client fits its GP surrogate at a point (static settings).

  At a point :math:`x` the GP is fitted to the ``num_nearest`` stored
  queries nearest to :math:`x` (:meth:`QueryHistory.nearest`; all stored
  ones if ``None`` or if fewer are stored), with ``kernel`` and either a
  fixed ``lengthscale`` or (``'ml'``) the maximum-likelihood one of those
  queries (:func:`kernels.fit_lengthscale`: ``restarts`` starts, the first
  at the previous fit's value, ``steps`` Adam steps each). The FZooS
  reference code: Matérn-5/2, maximum likelihood, the 150 nearest of all
  queries.

  Attributes:
    kernel: ``'matern52'`` or ``'se'``.
    lengthscale: a float, or ``'ml'``.
    noise: :math:`s^2` (on values normalised to [0, 1]).
    num_nearest: queries fitted, or ``None``: all stored.
    restarts, steps: of the maximum-likelihood fit.
  """

  kernel: str
  lengthscale: Union[float, str]
  noise: float
  num_nearest: Optional[int]
  restarts: int = 4
  steps: int = 20

  @property
  def initial_lengthscale(self) -> float:
    """The lengthscale before any fit (the first start of the first one)."""
    return 1.0 if self.lengthscale == 'ml' else float(self.lengthscale)

  def select(self, history: QueryHistory, x: jax.Array) -> QueryHistory:
    """The queries the GP at ``x`` is fitted to."""
    if self.num_nearest is None or self.num_nearest >= history.values.shape[0]:
      return history
    return history.nearest(x, self.num_nearest)

  def gradient(self, key: jax.Array, history: QueryHistory, x: jax.Array,
               lengthscale: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""``(∇μ(x), ℓ)``: the posterior mean gradient at ``x`` and the
    lengthscale used (fitted from ``lengthscale`` if ``'ml'``; ``key`` draws
    the restarts)."""
    local = self.select(history, x)
    if self.lengthscale == 'ml':
      lengthscale = ml_lengthscale(
          key, local, x, kernel=self.kernel, noise=self.noise,
          init=lengthscale, restarts=self.restarts, steps=self.steps)
    gradient = posterior_mean_gradient(local, x, kernel=self.kernel,
                                       lengthscale=lengthscale,
                                       noise=self.noise)
    return gradient, jnp.asarray(lengthscale, jnp.float32)

  def points_to_query(self, key: jax.Array, history: QueryHistory,
                      x: jax.Array, lengthscale: jax.Array, *,
                      num_candidates: int, num_chosen: int,
                      radius) -> jax.Array:
    """``x`` and its :func:`active_queries`, scored by the GP at ``x``
    with ``lengthscale`` (the last fit's), knowing that ``x`` itself is
    queried too: ``(1 + num_chosen, d)``."""
    with_x = history.add(x[None], jnp.zeros((1,), jnp.float32))  # y unused
    chosen = active_queries(
        key, self.select(with_x, x), x, num_candidates=num_candidates,
        num_chosen=num_chosen, radius=radius, kernel=self.kernel,
        lengthscale=lengthscale, noise=self.noise)
    return jnp.concatenate([x[None], chosen])
