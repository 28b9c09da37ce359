"""Tests for zojax.cge."""

import chex
import jax.flatten_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized

import zojax
from tests.objectives import quadratic_problem


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


class CGETest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters('forward', 'central')
  def test_full_cge_shapes_and_counts(self, difference):
    params, obj_fn = quadratic_problem()
    tx = zojax.cge(1e-3, difference=difference, batch_size=5)
    update, state = self.variant(
        lambda s, p: tx.update(None, s, p, obj_fn=obj_fn))(tx.init(params),
                                                           params)
    chex.assert_trees_all_equal_shapes_and_dtypes(update, params)
    info = zojax.estimate_info(state)
    self.assertEqual(info.num_evals, 13 if difference == 'forward' else 24)

  def test_central_cge_is_exact_on_quadratics_up_to_rounding(self):
    params, obj_fn = quadratic_problem()
    true = _flat(jax.grad(obj_fn)(params))
    # The central difference of a quadratic has no truncation error at any
    # sigma; a large sigma keeps float32 rounding (eps |f| / sigma) ~1e-5.
    tx = zojax.cge(0.5, difference='central')
    update, _ = tx.update(None, tx.init(params), params, obj_fn=obj_fn)
    np.testing.assert_allclose(_flat(update), true, rtol=1e-4, atol=1e-4)
    # while the forward difference at that sigma is visibly off
    forward = zojax.cge(0.5)
    update, _ = forward.update(None, forward.init(params), params,
                               obj_fn=obj_fn)
    self.assertGreater(np.abs(_flat(update) - true).max(), 0.1)

  def test_forward_cge_error_is_order_sigma(self):
    # forward error on coordinate j is (sigma / 2) * d^2 f / d theta_j^2.
    params, obj_fn = quadratic_problem()
    true = _flat(jax.grad(obj_fn)(params))
    hess_diag = _flat(jax.tree.map(
        jnp.diag, jax.hessian(lambda v: obj_fn(unravel(v)))(ravel(params))))
    errors = []
    for sigma in (1e-1, 5e-2):
      tx = zojax.cge(sigma)
      update, _ = tx.update(None, tx.init(params), params, obj_fn=obj_fn)
      error = _flat(update) - true
      np.testing.assert_allclose(error, sigma / 2 * hess_diag, rtol=2e-2,
                                 atol=2e-3)
      errors.append(np.linalg.norm(error))
    np.testing.assert_allclose(errors[0] / errors[1], 2.0, rtol=0.05)

  def test_sampled_coordinates_only_and_distinct(self):
    params, obj_fn = quadratic_problem()
    true = _flat(jax.grad(obj_fn)(params))
    tx = zojax.cge(1e-2, num_coords=5, difference='central', batch_size=2)
    state = tx.init(params)
    step = jax.jit(lambda s: tx.update(None, s, params, obj_fn=obj_fn))
    seen = np.zeros(true.size)
    for _ in range(60):
      update, state = step(state)
      flat = _flat(update)
      nonzero = flat != 0
      self.assertEqual(int(nonzero.sum()), 5)
      np.testing.assert_allclose(flat[nonzero], true[nonzero], rtol=1e-2,
                                 atol=1e-2)
      seen += nonzero
    # uniform sampling: each of the 12 coordinates is picked 60*5/12 = 25
    # times on average; all of them at least a few times.
    self.assertGreater(seen.min(), 10)
    self.assertLess(seen.max(), 45)
    self.assertEqual(zojax.estimate_info(state).num_evals, 60 * 10)

  def test_mask_restricts_coordinates(self):
    params, obj_fn = quadratic_problem()
    element_mask = jnp.array([True, False, False, True, False, False])
    mask = {'x': element_mask, 'layer': {'y': False}}
    tx = zojax.cge(1e-3, mask=mask)
    update, state = tx.update(None, tx.init(params), params, obj_fn=obj_fn)
    self.assertEqual(zojax.estimate_info(state).num_evals, 3)
    np.testing.assert_array_equal(update['layer']['y'], 0)
    self.assertEqual(int(jnp.sum(update['x'] != 0)), 2)
    np.testing.assert_array_equal(update['x'][~element_mask], 0)

  def test_sampled_with_traced_magnitude_mask(self):
    params, obj_fn = quadratic_problem()
    rule = zojax.masks.by_magnitude(0.5, keep='largest')
    tx = zojax.cge(1e-3, num_coords=3, mask=rule)
    update, _ = jax.jit(lambda s, p: tx.update(None, s, p, obj_fn=obj_fn))(
        tx.init(params), params)
    allowed = _flat(rule(params))
    chosen = _flat(update) != 0
    self.assertEqual(int(chosen.sum()), 3)
    self.assertTrue(np.all(allowed[chosen]))

  def test_path_rule_selects_layers(self):
    params, obj_fn = quadratic_problem()
    tx = zojax.cge(1e-3, mask=zojax.masks.by_path('^x$'))
    update, state = tx.update(None, tx.init(params), params, obj_fn=obj_fn)
    self.assertEqual(zojax.estimate_info(state).num_evals, 7)
    np.testing.assert_array_equal(update['layer']['y'], 0)

  def test_ask_tell_matches_update(self):
    params, obj_fn = quadratic_problem()
    tx = zojax.cge(1e-2, num_coords=4, difference='central')
    state = tx.init(params)
    expected, _ = tx.update(None, state, params, obj_fn=obj_fn)
    points = tx.ask(state, params)
    values = np.array([float(obj_fn(jax.tree.map(lambda x, i=i: x[i], points)))
                       for i in range(8)])
    chex.assert_trees_all_close(tx.tell(state, params, points, values)[0],
                                expected, rtol=1e-3, atol=1e-3)

  def test_training_a_quadratic_converges(self):
    params, obj_fn = quadratic_problem()
    tx = optax.chain(zojax.cge(1e-3, difference='central'), optax.sgd(0.1))
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(None, s, p, obj_fn=obj_fn))
    p = params
    for _ in range(300):
      u, state = step(p, state)
      p = optax.apply_updates(p, u)
    grad_norm = np.linalg.norm(_flat(jax.grad(obj_fn)(p)))
    self.assertLess(grad_norm, 1e-2)

  def test_errors(self):
    params, obj_fn = quadratic_problem()
    with self.assertRaisesRegex(ValueError, 'sigma'):
      zojax.cge(0.0)
    with self.assertRaisesRegex(ValueError, 'num_coords'):
      zojax.cge(1e-3, num_coords=0)
    with self.assertRaisesRegex(ValueError, 'exceeds'):
      zojax.cge(1e-3, num_coords=100).init(params)
    with self.assertRaisesRegex(ValueError, 'difference'):
      zojax.cge(1e-3, difference='sideways')
    tx = zojax.cge(1e-3, mask=zojax.masks.by_magnitude(0.5))
    with self.assertRaisesRegex(ValueError, 'concrete mask'):
      jax.jit(lambda s, p: tx.update(None, s, p, obj_fn=obj_fn))(
          tx.init(params), params)
    with self.assertRaisesRegex(ValueError, 'scalar'):
      zojax.cge(1e-3).update(None, zojax.cge(1e-3).init(params), params,
                             obj_fn=lambda p: jnp.stack([obj_fn(p)] * 2))


def ravel(tree):
  return jax.flatten_util.ravel_pytree(tree)[0]


def unravel(vector):
  params, _ = quadratic_problem()
  return jax.flatten_util.ravel_pytree(params)[1](vector)
