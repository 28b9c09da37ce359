"""Tests for the FZooS kernels and their maximum-likelihood lengthscale."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from zojax._src.estimators import kernels

KERNELS = ('matern52', 'se')


def explicit_kernel(kernel, a, b, lengthscale):
  """k(a, b) written from the textbook formulas (Rasmussen & Williams)."""
  r = jnp.linalg.norm(a - b)
  if kernel == 'se':
    return jnp.exp(-r**2 / (2 * lengthscale**2))
  u = jnp.sqrt(5.0) * r / lengthscale
  return (1 + u + 5 * r**2 / (3 * lengthscale**2)) * jnp.exp(-u)


def gp_sample(kernel, lengthscale, seed, count=60, dim=2, noise=1e-4):
  """Points in [0, 1]^dim and a draw of the zero-mean unit-variance GP at
  them (float64 Cholesky), with their squared distances."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(0, 1, size=(count, dim))
  sq = ((x[:, None] - x[None]) ** 2).sum(-1)
  cov = np.asarray(kernels.value(kernel, jnp.asarray(sq, jnp.float32),
                                 lengthscale), np.float64)
  y = np.linalg.cholesky(cov + noise * np.eye(count)) @ rng.normal(size=count)
  return jnp.asarray(sq, jnp.float32), jnp.asarray(y, jnp.float32)


class KernelTest(parameterized.TestCase):

  @parameterized.product(kernel=KERNELS, lengthscale=(0.4, 1.5))
  def test_value_and_gradient_weight_match_autodiff(self, kernel,
                                                    lengthscale):
    a = jnp.array([0.1, -0.3, 0.5])
    for b in (jnp.array([0.4, 0.2, 0.1]), jnp.array([2.0, -1.0, 0.5])):
      sq = jnp.sum((a - b) ** 2)
      np.testing.assert_allclose(kernels.value(kernel, sq, lengthscale),
                                 explicit_kernel(kernel, a, b, lengthscale),
                                 rtol=1e-5)
      grad = jax.grad(explicit_kernel, 1)(kernel, a, b, lengthscale)
      np.testing.assert_allclose(
          kernels.gradient_weight(kernel, sq, lengthscale) * (b - a), grad,
          rtol=1e-4, atol=1e-7)

  @parameterized.product(kernel=KERNELS, lengthscale=(0.4, 1.5))
  def test_derivative_variance_is_the_prior_covariance_of_the_gradient(
      self, kernel, lengthscale):
    """Cov[∂_i f(x), ∂_j f(x')] = -∂²k(τ)/∂τ_i∂τ_j → δ_ij w(0) as τ → 0
    (evaluated at |τ| = 1e-3 ℓ: Matérn's mixed derivative has no autodiff
    value at τ = 0 itself)."""
    tau = 1e-3 * lengthscale * jnp.array([0.6, 0.0, -0.8])
    covariance = -jax.hessian(lambda t: explicit_kernel(
        kernel, t, jnp.zeros(3), lengthscale))(tau)
    np.testing.assert_allclose(
        covariance, kernels.derivative_variance(kernel, lengthscale)
        * jnp.eye(3), rtol=1e-2, atol=1e-2 / lengthscale**2)

  @parameterized.parameters(*KERNELS)
  def test_likelihood_derivative_matches_autodiff(self, kernel):
    sq, y = gp_sample(kernel, 0.3, seed=0, count=20)
    valid = jnp.arange(20) < 15          # 5 empty slots
    y = jnp.where(valid, y, 0.0)
    nll = lambda t: kernels.negative_log_likelihood(kernel, t, sq, y, valid,
                                                    1e-4)
    thetas = jnp.array([-1.5, -0.5, 0.5])
    loss, derivative = jax.jit(jax.vmap(nll))(thetas)
    want = jax.jit(jax.vmap(jax.grad(lambda t: nll(t)[0])))(thetas)
    np.testing.assert_allclose(derivative, want, rtol=2e-3,
                               atol=1e-3 * float(jnp.abs(loss).max()))

  @parameterized.parameters(*KERNELS)
  def test_fit_maximises_the_likelihood(self, kernel):
    """From a start 5x too long, the fit increases the marginal likelihood
    and lands on the optimum of a dense grid of the same objective."""
    sq, y = gp_sample(kernel, 0.3, seed=1)
    valid = jnp.ones(60, bool)
    fit = jax.jit(functools.partial(kernels.fit_lengthscale, kernel=kernel,
                                    noise=1e-4, restarts=4, steps=20))
    got = fit(jax.random.PRNGKey(0), sq_dists=sq, y=y, valid=valid, init=1.5)
    nll = jax.jit(jax.vmap(lambda t: kernels.negative_log_likelihood(
        kernel, t, sq, y, valid, 1e-4)[0]))
    grid = jnp.linspace(jnp.log(0.05), jnp.log(1.5), 400)
    values = nll(grid)
    self.assertLess(float(nll(jnp.log(got)[None])[0]),
                    float(nll(jnp.log(jnp.array([1.5])))[0]) - 10)
    np.testing.assert_allclose(got, jnp.exp(grid[jnp.argmin(values)]),
                               rtol=0.02)
    again = fit(jax.random.PRNGKey(0), sq_dists=sq, y=y, valid=valid,
                init=1.5)
    self.assertEqual(float(got), float(again))  # deterministic given key

  @parameterized.parameters(*KERNELS)
  def test_fit_recovers_the_lengthscale_of_gp_samples(self, kernel):
    """On draws of the GP itself (60 points in [0, 1]^2, ℓ = 0.3), the ML
    lengthscale is within 15% of the truth (over 8 seeds the ratio ranged
    0.92-1.09)."""
    fit = jax.jit(functools.partial(kernels.fit_lengthscale, kernel=kernel,
                                    noise=1e-4, restarts=4, steps=20))
    for seed in range(3):
      sq, y = gp_sample(kernel, 0.3, seed=seed)
      got = fit(jax.random.PRNGKey(seed), sq_dists=sq, y=y,
                valid=jnp.ones(60, bool), init=1.0)
      np.testing.assert_allclose(got, 0.3, rtol=0.15)

  def test_fit_falls_back_to_its_start_without_data(self):
    got = jax.jit(lambda key: kernels.fit_lengthscale(
        key, 'matern52', jnp.zeros((4, 4)), jnp.zeros(4), jnp.zeros(4, bool),
        noise=1e-6, init=0.7, restarts=3, steps=5))(jax.random.PRNGKey(0))
    np.testing.assert_allclose(got, 0.7, rtol=1e-6)


if __name__ == '__main__':
  absltest.main()
