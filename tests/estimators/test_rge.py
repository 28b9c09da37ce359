"""Tests for zojax.rge."""

from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import absltest
from absl.testing import parameterized

import zojax
from tests.objectives import quadratic_problem, run_steps
from zojax._src.core import backend


def _step(tx, state, params, obj_fn):
  return tx.update(None, state, params, obj_fn=obj_fn)


class RGETest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(
      distribution=('gaussian', 'sphere', 'rademacher'),
      difference=('forward', 'central'))
  def test_shapes_dtypes_and_counts(self, distribution, difference):
    params, obj_fn = quadratic_problem()
    tx = zojax.rge(5, 1e-3, distribution=distribution, difference=difference,
                   batch_size=2)
    state = tx.init(params)
    update, state = self.variant(
        lambda s, p: tx.update(None, s, p, obj_fn=obj_fn))(state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(update, params)
    chex.assert_tree_all_finite(update)
    info = zojax.estimate_info(state)
    self.assertEqual(info.num_evals, 6 if difference == 'forward' else 10)
    self.assertEqual(info['num_evals'], info.num_queries)
    self.assertEqual(info.steps, 1)
    np.testing.assert_allclose(info.value, obj_fn(params), rtol=1e-4)

  @parameterized.parameters(None, 1, 3, 7, 10)
  def test_batch_size_does_not_change_the_estimate(self, batch_size):
    params, obj_fn = quadratic_problem()
    # Chunks change only the float32 rounding of the objective values, which
    # the difference quotient amplifies by |f| eps / sigma ~ 1e-4 here.
    reference, _ = zojax.rge(7, 1e-2).update(
        None, zojax.rge(7, 1e-2).init(params), params, obj_fn=obj_fn)
    tx = zojax.rge(7, 1e-2, batch_size=batch_size)
    chunked, _ = tx.update(None, tx.init(params), params, obj_fn=obj_fn)
    chex.assert_trees_all_close(reference, chunked, rtol=1e-3, atol=1e-3)

  def test_estimate_info_inside_jit(self):
    params, obj_fn = quadratic_problem()
    tx = optax.chain(zojax.rge(3, 1e-3), optax.sgd(0.1))

    @jax.jit
    def evals_after_step(state):
      _, state = tx.update(None, state, params, obj_fn=obj_fn)
      return zojax.estimate_info(state).num_evals

    self.assertEqual(int(evals_after_step(tx.init(params))), 4)

  def test_key_is_split_every_step(self):
    params, obj_fn = quadratic_problem()
    tx = zojax.rge(3, 1e-3)
    state = tx.init(params)
    first, state = tx.update(None, state, params, obj_fn=obj_fn)
    second, state = tx.update(None, state, params, obj_fn=obj_fn)
    self.assertFalse(np.allclose(first['x'], second['x']))
    self.assertEqual(zojax.estimate_info(state).num_evals, 8)

  @parameterized.product(
      distribution=('gaussian', 'sphere', 'rademacher'),
      difference=('forward', 'central'))
  def test_mean_over_keys_approaches_true_gradient(self, distribution,
                                                   difference):
    # On a quadratic the smoothed gradient equals the true gradient, so the
    # mean of many independent estimates must converge to jax.grad.
    params, obj_fn = quadratic_problem()
    true = jnp.concatenate([jnp.ravel(g) for g in
                            jax.tree.leaves(jax.grad(obj_fn)(params))])
    tx = zojax.rge(8, 1e-2, distribution=distribution, difference=difference)
    keys = jax.random.split(jax.random.PRNGKey(42), 4000)
    rows, _ = zojax.diagnostics.estimates_over_keys(tx, obj_fn, params, keys,
                                                    batch_size=500)
    mean = rows.mean(axis=0)
    # Standard error of the mean, per coordinate, from the sample itself.
    stderr = rows.std(axis=0) / np.sqrt(len(keys))
    np.testing.assert_array_less(np.abs(mean - true), 5 * stderr + 1e-3)
    # and the test has power: the error is small relative to the gradient.
    self.assertLess(float(jnp.linalg.norm(mean - true) /
                          jnp.linalg.norm(true)), 0.1)

  def test_single_query_variance_matches_theory(self):
    # Gaussian, central, exact directional derivative on a quadratic:
    # E||(g.z) z||^2 = (d + 2)||g||^2, so tr Cov = (d + 1)||g||^2.
    params, obj_fn = quadratic_problem()
    g = jnp.concatenate([jnp.ravel(x) for x in
                         jax.tree.leaves(jax.grad(obj_fn)(params))])
    d = g.size
    tx = zojax.rge(1, 1e-3, difference='central')
    keys = jax.random.split(jax.random.PRNGKey(3), 20000)
    rows, _ = zojax.diagnostics.estimates_over_keys(tx, obj_fn, params, keys,
                                                    batch_size=2000)
    total_variance = float(jnp.sum(jnp.var(rows, axis=0)))
    np.testing.assert_allclose(total_variance, (d + 1) * float(g @ g),
                               rtol=0.06)

  def test_sphere_scaling_constant(self):
    # The unit-sphere estimate of a linear function is d (g.u) u: its mean is g.
    params = {'w': jnp.zeros(10)}
    g = jnp.arange(1.0, 11.0)
    obj_fn = lambda p: g @ p['w']
    tx = zojax.rge(1, 0.5, distribution='sphere', difference='central')
    keys = jax.random.split(jax.random.PRNGKey(0), 20000)
    rows, _ = zojax.diagnostics.estimates_over_keys(tx, obj_fn, params, keys)
    np.testing.assert_allclose(rows.mean(axis=0), g, rtol=0.08, atol=0.3)
    # each estimate is d (g.u) u with |u| = 1, so |ĝ| = d |g.u| = |ĝ.g| / |ĝ|·...
    # i.e. ĝ.g = |ĝ|^2 / d exactly.
    np.testing.assert_allclose(rows @ g, jnp.sum(rows**2, axis=1) / 10,
                               rtol=1e-3, atol=1e-3)

  def test_rademacher_central_single_query_is_spsa(self):
    params, obj_fn = quadratic_problem()
    tx = zojax.rge(1, 1e-2, distribution='rademacher', difference='central')
    state = tx.init(params)
    update, _ = tx.update(None, state, params, obj_fn=obj_fn)
    points = tx.ask(state, params)
    delta = jax.tree.map(lambda p, x: (x[0] - p) / 1e-2, params, points)
    for leaf in jax.tree.leaves(delta):  # directions are ±1
      np.testing.assert_allclose(np.abs(leaf), 1.0, rtol=1e-3)
    plus = jax.tree.map(lambda p, d: p + 1e-2 * d, params, delta)
    minus = jax.tree.map(lambda p, d: p - 1e-2 * d, params, delta)
    scalar = (obj_fn(plus) - obj_fn(minus)) / (2 * 1e-2)
    expected = jax.tree.map(lambda d: scalar * d, delta)  # 1/Δ_i = Δ_i
    chex.assert_trees_all_close(update, expected, rtol=1e-3, atol=1e-3)

  @parameterized.parameters('gaussian', 'sphere', 'rademacher')
  def test_mask_is_respected(self, distribution):
    params, obj_fn = quadratic_problem()
    element_mask = jnp.array([True, False, True, False, True, False])
    mask = {'x': element_mask, 'layer': {'y': False}}
    tx = zojax.rge(4, 1e-3, mask=mask, distribution=distribution)
    update, state = tx.update(None, tx.init(params), params, obj_fn=obj_fn)
    np.testing.assert_array_equal(update['layer']['y'], 0.0)
    np.testing.assert_array_equal(update['x'][~element_mask], 0.0)
    self.assertTrue(bool(jnp.all(update['x'][element_mask] != 0.0)))
    # perturbed points never move masked coordinates either
    points = tx.ask(state, params)
    np.testing.assert_array_equal(
        points['layer']['y'], jnp.broadcast_to(params['layer']['y'],
                                               points['layer']['y'].shape))

  def test_path_mask_rule(self):
    params, obj_fn = quadratic_problem()
    tx = zojax.rge(4, 1e-3, mask=zojax.masks.by_path('layer'))
    update, _ = tx.update(None, tx.init(params), params, obj_fn=obj_fn)
    np.testing.assert_array_equal(update['x'], 0.0)
    self.assertTrue(bool(jnp.all(update['layer']['y'] != 0)))

  def test_inf_in_one_query_also_skips(self):
    params, obj_fn = quadratic_problem()
    # +inf only at perturbed points whose x[0] went up
    bad = lambda p: jnp.where(p['x'][0] > params['x'][0], jnp.inf, obj_fn(p))
    tx = zojax.rge(8, 1e-3)
    update, state = tx.update(None, tx.init(params), params, obj_fn=bad)
    self.assertTrue(all(bool(jnp.all(jnp.isnan(u)))
                        for u in jax.tree.leaves(update)))
    self.assertEqual(zojax.estimate_info(state).skipped_steps, 1)

  def test_drop_in_for_optax_chain_with_schedules(self):
    params, obj_fn = quadratic_problem()
    tx = optax.chain(zojax.rge(16, 1e-3, difference='central'),
                     optax.sgd(optax.exponential_decay(0.05, 100, 0.5)))
    p, _ = run_steps(tx, params, obj_fn, 200)
    self.assertLess(float(obj_fn(p)), float(obj_fn(params)) - 1.0)

  def test_errors(self):
    params, obj_fn = quadratic_problem()
    for kwargs, message in [
        (dict(num_queries=4, sigma=0.0), 'sigma'),
        (dict(num_queries=4, sigma=-1.0), 'sigma'),
        (dict(num_queries=4, sigma=float('nan')), 'sigma'),
        (dict(num_queries=0, sigma=1e-3), 'num_queries'),
        (dict(num_queries=2.5, sigma=1e-3), 'num_queries'),
        (dict(num_queries=4, sigma=1e-3, distribution='uniform'),
         'distribution'),
        (dict(num_queries=4, sigma=1e-3, difference='backward'), 'difference'),
        (dict(num_queries=4, sigma=1e-3, batch_size=0), 'batch_size'),
    ]:
      with self.assertRaisesRegex(ValueError, message):
        zojax.rge(**kwargs)
    tx = zojax.rge(4, 1e-3)
    state = tx.init(params)
    with self.assertRaisesRegex(ValueError, r'scalar.*shape \(6,\)'):
      tx.update(None, state, params, obj_fn=lambda p: p['x'] * 2)
    with self.assertRaisesRegex(ValueError, 'obj_fn'):
      tx.update(None, state, params)
    with self.assertRaisesRegex(ValueError, 'same pytree structure'):
      zojax.rge(4, 1e-3, mask={'x': True}).init(params)
    with self.assertRaisesRegex(ValueError, 'does not broadcast'):
      zojax.rge(4, 1e-3, mask={'x': jnp.ones(3, bool),
                               'layer': {'y': True}}).init(params)
    with self.assertRaisesRegex(ValueError, 'freezes every parameter'):
      zojax.rge(4, 1e-3, mask=lambda p: jax.tree.map(lambda _: False, p)
                ).init(params)
    with self.assertRaisesRegex(ValueError, 'floating-point'):
      tx.init({'w': jnp.arange(3)})



class AcceleratorPathTest(parameterized.TestCase):
  """The GPU/TPU code path (regenerated directions, fused reduction) must give
  the same estimate as the CPU path; exercised here on the CPU."""

  @parameterized.parameters('gaussian', 'sphere', 'rademacher')
  def test_same_estimate_on_both_paths(self, distribution):
    params, obj_fn = quadratic_problem()
    mask = {'x': jnp.array([True, True, False, True, True, True]),
            'layer': {'y': True}}
    tx = zojax.rge(6, 1e-2, distribution=distribution, batch_size=4,
                   mask=mask)
    state = tx.init(params)
    step = lambda: jax.jit(lambda s, p: tx.update(None, s, p,
                                                  obj_fn=obj_fn))(state,
                                                                  params)
    cpu_path, _ = step()
    with mock.patch.object(backend, 'on_accelerator', return_value=True):
      accelerator_path, _ = step()
    chex.assert_trees_all_close(cpu_path, accelerator_path, rtol=1e-4,
                                atol=1e-4)


class RbgKeyTest(absltest.TestCase):
  """A typed key of another implementation ('rbg') works as ``seed``: the
  state holds Threefry key data drawn from it, and the estimator stays
  unbiased."""

  def test_rbg_keyed_estimator_mean_approaches_gradient(self):
    params, obj_fn = quadratic_problem()
    true = jnp.concatenate([jnp.ravel(g) for g in
                            jax.tree.leaves(jax.grad(obj_fn)(params))])
    tx = zojax.rge(8, 1e-2, distribution='rademacher',
                   seed=jax.random.key(0, impl='rbg'))
    self.assertEqual(tx.init(params).key.dtype, jnp.uint32)
    keys = jax.random.split(jax.random.key(1, impl='rbg'), 3000)
    rows, _ = zojax.diagnostics.estimates_over_keys(tx, obj_fn, params, keys,
                                                    batch_size=500)
    stderr = rows.std(axis=0) / np.sqrt(len(keys))
    np.testing.assert_array_less(np.abs(rows.mean(axis=0) - true),
                                 5 * stderr + 1e-3)


if __name__ == '__main__':
  pytest.main([__file__])
