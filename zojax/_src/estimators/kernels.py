r"""The kernels of the FZooS surrogates and their maximum-likelihood
lengthscale.

Two stationary isotropic kernels of :math:`r = \|x - x'\|` with lengthscale
:math:`\ell` (Rasmussen & Williams, *Gaussian Processes for Machine
Learning*, 2006, eqs. 4.9 and 4.17):

* squared exponential (``'se'``): :math:`k(r) = \exp(-r^2/2\ell^2)`;
* Matérn-5/2 (``'matern52'``): with :math:`u = \sqrt5\, r/\ell`,
  :math:`k(r) = (1 + u + u^2/3)\,e^{-u}`, twice differentiable (the GP's
  sample paths are, once), what the FZooS reference code fits.

The surrogate needs a kernel only through :math:`k` and its *gradient
weight* :math:`w(r)`, defined by :math:`\nabla_x k(x, x') = w(r)\,(x' - x)`:

.. math::
  w_{SE}(r) = k(r)/\ell^2,\qquad
  w_{5/2}(r) = \frac{5}{3\ell^2}(1 + u)\,e^{-u},

the second from :math:`dk/du = -\tfrac13 u(1 + u)e^{-u}`,
:math:`du/dr = \sqrt5/\ell` and :math:`\nabla_x r = (x - x')/r`. Its value
at 0 is the prior variance of every partial derivative,
:math:`\operatorname{Cov}[\partial_i f(x), \partial_j f(x)] = \delta_{ij}
w(0)` (:math:`1/\ell^2` and :math:`5/3\ell^2`).

:func:`fit_lengthscale` maximises the log marginal likelihood of the
lengthscale (the reference code: scikit-learn's ``GaussianProcessRegressor``
with 20 L-BFGS restarts, in float64) with a few vmapped restarts of a short
Adam loop on :math:`\log\ell`, in float32 and under ``jit`` (fixed shapes and
iteration count).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from zojax._src.core import keys

KERNELS = ('matern52', 'se')
# Lengthscales are searched within this factor of the data's scale (the
# root-mean-square distance between the fitted points) either way; random
# restarts start within the square root of it.
SEARCH_FACTOR = 100.0


def _distance_ratio(sq_dists: jax.Array, lengthscale) -> jax.Array:
  """:math:`u = \\sqrt5\\,r/\\ell` (finite gradients at :math:`r = 0`)."""
  return jnp.sqrt(5.0 * jnp.maximum(sq_dists, 1e-36)) / lengthscale


def value(kernel: str, sq_dists: jax.Array, lengthscale) -> jax.Array:
  """:math:`k` at squared distances ``sq_dists`` (any shape)."""
  if kernel == 'se':
    return jnp.exp(-sq_dists / (2 * lengthscale**2))
  u = _distance_ratio(sq_dists, lengthscale)
  return (1 + u + u * u / 3) * jnp.exp(-u)


def gradient_weight(kernel: str, sq_dists: jax.Array,
                    lengthscale) -> jax.Array:
  r""":math:`w(r)` with :math:`\nabla_x k(x, x') = w(r)(x' - x)` (module
  doc)."""
  if kernel == 'se':
    return value(kernel, sq_dists, lengthscale) / lengthscale**2
  u = _distance_ratio(sq_dists, lengthscale)
  return 5.0 / (3.0 * lengthscale**2) * (1 + u) * jnp.exp(-u)


def derivative_variance(kernel: str, lengthscale) -> jax.Array:
  r""":math:`w(0)`, the prior variance of each partial derivative."""
  return (1.0 if kernel == 'se' else 5.0 / 3.0) / jnp.asarray(
      lengthscale, jnp.float32)**2


def log_lengthscale_derivative(kernel: str, sq_dists: jax.Array,
                               lengthscale) -> jax.Array:
  r""":math:`\partial k/\partial\log\ell`: :math:`k\,r^2/\ell^2` (SE),
  :math:`\tfrac13 u^2(1 + u)e^{-u}` (Matérn-5/2)."""
  if kernel == 'se':
    return value(kernel, sq_dists, lengthscale) * sq_dists / lengthscale**2
  u = _distance_ratio(sq_dists, lengthscale)
  return u * u * (1 + u) / 3 * jnp.exp(-u)


def negative_log_likelihood(kernel: str, log_lengthscale, sq_dists: jax.Array,
                            y: jax.Array, valid: jax.Array, noise: float):
  r""":math:`L(\theta) = -\log p(y \mid \ell = e^\theta)` and
  :math:`dL/d\theta`, over the ``valid`` points.

  With :math:`A = K + s^2I` (zero prior mean, unit prior variance: values
  normalised to [0, 1]) and :math:`\alpha = A^{-1}y`,

  .. math::
    L = \tfrac12 y^\top\alpha + \tfrac12\log|A| + \tfrac n2\log 2\pi,
    \qquad
    \frac{dL}{d\theta} = \tfrac12\operatorname{tr}\Big(
      (A^{-1} - \alpha\alpha^\top)\frac{\partial K}{\partial\theta}\Big)

  (Rasmussen & Williams, eqs. 5.8 and 5.9), through the Cholesky factor
  :math:`A = LL^\top`: :math:`\operatorname{tr}(A^{-1}D) =
  \sum_{ij}(L^{-1}D)_{ij}(L^{-1})_{ij}`. Invalid slots enter as an identity
  block with :math:`y = 0`, which adds nothing. Non-finite where float32
  finds :math:`A` not positive definite (a very long lengthscale on
  clustered points).

  Returns:
    ``(L, dL/dtheta)``, float32 scalars.
  """
  lengthscale = jnp.exp(log_lengthscale)
  both = valid[:, None] & valid[None, :]
  matrix = jnp.where(both, value(kernel, sq_dists, lengthscale), 0.0)
  matrix = matrix + jnp.diag(jnp.where(valid, noise, 1.0))
  derivative = jnp.where(
      both, log_lengthscale_derivative(kernel, sq_dists, lengthscale), 0.0)
  chol = jnp.linalg.cholesky(matrix)
  inv_chol = jax.scipy.linalg.solve_triangular(
      chol, jnp.eye(y.shape[0], dtype=matrix.dtype), lower=True)
  alpha = inv_chol.T @ (inv_chol @ y)
  loss = (0.5 * y @ alpha + jnp.sum(jnp.log(jnp.diag(chol)))
          + 0.5 * jnp.sum(valid) * jnp.log(2 * jnp.pi))
  grad = 0.5 * (jnp.sum((inv_chol @ derivative) * inv_chol)
                - alpha @ derivative @ alpha)
  return loss, grad


def fit_lengthscale(key: jax.Array, kernel: str, sq_dists: jax.Array,
                    y: jax.Array, valid: jax.Array, *, noise: float, init,
                    restarts: int, steps: int) -> jax.Array:
  r"""The maximum-likelihood lengthscale :math:`\ell^*`.

  Minimises :func:`negative_log_likelihood` over :math:`\theta = \log\ell`
  from ``restarts`` starts, vmapped: ``init`` (clipped to the search range)
  and ``restarts - 1`` draws, log-uniform within a factor
  :math:`\sqrt{F}` of the data's scale :math:`\rho` (the root-mean-square
  distance between the valid points), :math:`F` = ``SEARCH_FACTOR``. Each
  runs ``steps`` Adam steps (learning rate 0.2, cosine-decayed), clipped to
  :math:`[\rho/F, F\rho]`; the best point any restart visited is returned.
  Deterministic given ``key``. Where every evaluation fails (non-finite),
  returns ``init`` clipped.

  Args:
    key: raw key data, for the random starts.
    kernel: ``'matern52'`` or ``'se'``.
    sq_dists: ``(n, n)`` squared distances between the points.
    y: ``(n,)`` values (0 on invalid slots).
    valid: ``(n,)`` bool.
    noise: :math:`s^2`.
    init: the first start (e.g. the previous fit's lengthscale).
    restarts, steps: static counts.

  Returns:
    A float32 scalar.
  """
  n = y.shape[0]
  pairs = valid[:, None] & valid[None, :] & ~jnp.eye(n, dtype=bool)
  mean_sq = jnp.sum(jnp.where(pairs, sq_dists, 0.0)) / jnp.maximum(
      jnp.sum(pairs), 1)
  log_scale = jnp.where(mean_sq > 0, 0.5 * jnp.log(mean_sq), 0.0)
  width = jnp.log(SEARCH_FACTOR)
  lo, hi = log_scale - width, log_scale + width
  starts = jnp.concatenate([
      jnp.clip(jnp.log(jnp.asarray(init, jnp.float32)), lo, hi)[None],
      log_scale + width * jax.random.uniform(
          keys.typed(key), (restarts - 1,), jnp.float32, -0.5, 0.5)])
  objective = lambda theta: negative_log_likelihood(
      kernel, theta, sq_dists, y, valid, noise)
  optimizer = optax.adam(optax.cosine_decay_schedule(0.2, steps))

  def descend(theta):
    def body(carry, _):
      theta, opt_state, best_theta, best = carry
      loss, grad = objective(theta)
      finite = jnp.isfinite(loss) & jnp.isfinite(grad)
      better = finite & (loss < best)
      best_theta = jnp.where(better, theta, best_theta)
      best = jnp.where(better, loss, best)
      update, opt_state = optimizer.update(jnp.where(finite, grad, 0.0),
                                           opt_state)
      theta = jnp.clip(theta + update, lo, hi)
      return (theta, opt_state, best_theta, best), None

    carry = (theta, optimizer.init(theta), theta, jnp.asarray(jnp.inf))
    (_, _, best_theta, best), _ = jax.lax.scan(body, carry, None, steps)
    return best_theta, best

  thetas, losses = jax.vmap(descend)(starts)
  return jnp.exp(thetas[jnp.argmin(losses)])
