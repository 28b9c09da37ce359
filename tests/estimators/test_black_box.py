"""Tests for zojax.black_box (a query-only function with a ZO VJP)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import zojax

A = jnp.diag(jnp.arange(1.0, 5.0)) + 0.1


def per_example_quadratic(x):
  """0.5 x^T A x + x_0 for each example (rows of x, flattened)."""
  x = x.reshape(x.shape[0], -1)
  return 0.5 * jnp.einsum('bi,ij,bj->b', x, A, x) + x[:, 0]


def true_vjp(x, weights):
  return jax.grad(lambda x: jnp.sum(weights * per_example_quadratic(x)))(x)


class BlackBoxTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 2))
    self.weights = jnp.array([1.0, -2.0, 0.5])

  def test_forward_is_the_function(self):
    bb = zojax.black_box(per_example_quadratic, 1e-2, num_queries=4)
    np.testing.assert_allclose(bb(jax.random.PRNGKey(1), self.x),
                               per_example_quadratic(self.x), rtol=1e-6)

  @parameterized.parameters(None, 3)
  def test_coordinates_central_is_exact_on_quadratics(self, batch_size):
    bb = zojax.black_box(per_example_quadratic, 1e-2,
                         distribution='coordinates', difference='central',
                         batch_size=batch_size)
    grad = jax.grad(lambda x: jnp.sum(
        self.weights * bb(jax.random.PRNGKey(1), x)))(self.x)
    chex.assert_trees_all_close(grad, true_vjp(self.x, self.weights),
                                atol=2e-3)

  @parameterized.parameters('gaussian', 'sphere')
  def test_random_directions_are_unbiased_on_quadratics(self, directions):
    bb = zojax.black_box(per_example_quadratic, 1e-3, num_queries=8,
                         distribution=directions, difference='central')
    keys = jax.random.split(jax.random.PRNGKey(2), 3000)
    grads = jax.jit(jax.vmap(lambda k: jax.grad(lambda x: jnp.sum(
        self.weights * bb(k, x)))(self.x)))(keys)
    mean, spread = grads.mean(0), grads.std(0) / np.sqrt(len(keys))
    error = np.abs(mean - true_vjp(self.x, self.weights))
    # Within 5 standard errors everywhere (a wrong scale, e.g. a missing
    # phi = d for the sphere, is off by many).
    self.assertTrue(np.all(error < 5 * spread + 1e-3), (error, spread))

  def test_chain_rule_through_differentiable_parts(self):
    # params -> (linear "encoder") -> black box -> loss: grads reach params.
    w = jax.random.normal(jax.random.PRNGKey(3), (4, 4))
    inputs = jax.random.normal(jax.random.PRNGKey(4), (3, 4))
    bb = zojax.black_box(per_example_quadratic, 1e-2,
                         distribution='coordinates', difference='central')
    zo = jax.grad(lambda w: jnp.mean(bb(jax.random.PRNGKey(5), inputs @ w)))(w)
    fo = jax.grad(lambda w: jnp.mean(per_example_quadratic(inputs @ w)))(w)
    chex.assert_trees_all_close(zo, fo, atol=5e-3)

  def test_fn_is_only_called_on_input_shaped_batches(self):
    calls = []

    def counted(x):
      calls.append(x.shape)
      return per_example_quadratic(x)

    bb = zojax.black_box(counted, 1e-2, num_queries=5, batch_size=5)
    jax.grad(lambda x: jnp.sum(bb(jax.random.PRNGKey(0), x)))(self.x)
    # Traced once for the forward and once for the vmapped perturbed copies
    # (5 copies of the (3, 2, 2) batch per call under vmap).
    self.assertEqual(calls, [(3, 2, 2), (3, 2, 2)])

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, 'sigma'):
      zojax.black_box(per_example_quadratic, 0.0, num_queries=2)
    with self.assertRaisesRegex(ValueError, 'num_queries'):
      zojax.black_box(per_example_quadratic, 1e-2)
    with self.assertRaisesRegex(ValueError, 'leave it None'):
      zojax.black_box(per_example_quadratic, 1e-2, num_queries=3,
                      distribution='coordinates')
    bb = zojax.black_box(lambda x: jnp.sum(x), 1e-2, num_queries=2)
    with self.assertRaisesRegex(ValueError, 'one value per example'):
      bb(jax.random.PRNGKey(0), self.x)


if __name__ == '__main__':
  absltest.main()
