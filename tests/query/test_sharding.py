"""Queries and data over a device mesh (``mesh=``, ``query_axis=``,
``data_axis=``) and the helpers of ``zojax.parallel``.

The same seed must give the same estimate on 1, 2, 4 and 8 (simulated CPU)
devices, up to float summation order.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

import zojax
from tests.objectives import least_squares_problem, quadratic_problem, run_steps

DEVICE_COUNTS = (1, 2, 4, 8)


def _mesh(n, names=('q',)):
  return jax.sharding.Mesh(np.array(jax.devices()[:n]), names)


def _estimate(tx, params, obj_fn, **update_args):
  state = tx.init(params)
  update, state = jax.jit(lambda s, p: tx.update(
      None, s, p, obj_fn=obj_fn, **update_args))(state, params)
  return update, zojax.estimate_info(state)


ESTIMATORS = {
    'rge_gaussian_forward': lambda **kw: zojax.rge(8, 1e-2, batch_size=2,
                                                   **kw),
    'rge_rademacher_central': lambda **kw: zojax.rge(
        16, 1e-2, distribution='rademacher', difference='central', **kw),
    'rge_sphere': lambda **kw: zojax.rge(8, 1e-2, distribution='sphere',
                                         **kw),
    'cge_sampled': lambda **kw: zojax.cge(1e-2, num_coords=8, batch_size=3,
                                          **kw),
    'cge_full_masked': lambda **kw: zojax.cge(
        1e-2, mask={'x': jnp.array([1, 0, 0, 1, 0, 0], bool),  # 8 coords
                    'layer': {'y': True}}, **kw),
    'forward_gradient': lambda **kw: zojax.forward_gradient(8, **kw),
}


class QueryShardingTest(parameterized.TestCase):

  @parameterized.named_parameters(*((name, name) for name in ESTIMATORS))
  def test_same_estimate_on_1_2_4_8_devices(self, name):
    params, obj_fn = quadratic_problem()
    make = ESTIMATORS[name]
    reference, reference_info = _estimate(make(), params, obj_fn)
    for n in DEVICE_COUNTS:
      update, info = _estimate(make(mesh=_mesh(n)), params, obj_fn)
      chex.assert_trees_all_close(update, reference, rtol=1e-4, atol=1e-4)
      self.assertEqual(info.num_evals, reference_info.num_evals)
      np.testing.assert_allclose(info.value, reference_info.value, rtol=1e-5)

  def test_optimizer_trajectory_is_device_count_independent(self):
    params, obj_fn = quadratic_problem()

    def run(**kw):
      tx = zojax.zo_adam(0.05, num_queries=8, seed=4, **kw)
      return run_steps(tx, params, obj_fn, 20)[0]

    chex.assert_trees_all_close(run(mesh=_mesh(8)), run(), rtol=1e-3,
                                atol=1e-3)

  def test_two_dimensional_mesh_names_its_query_axis(self):
    params, obj_fn = quadratic_problem()
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2),
                             ('q', 'data'))
    reference, _ = _estimate(zojax.rge(8, 1e-2), params, obj_fn)
    update, _ = _estimate(zojax.rge(8, 1e-2, mesh=mesh, query_axis='q'),
                          params, obj_fn)
    chex.assert_trees_all_close(update, reference, rtol=1e-4, atol=1e-4)

  def test_make_mesh_with_explicit_axes(self):
    # jax.make_mesh gives Explicit axis types on recent JAX versions.
    params, obj_fn = quadratic_problem()
    mesh = jax.make_mesh((8,), ('q',))
    reference, _ = _estimate(zojax.rge(16, 1e-2), params, obj_fn)
    update, _ = _estimate(zojax.rge(16, 1e-2, mesh=mesh), params, obj_fn)
    chex.assert_trees_all_close(update, reference, rtol=1e-4, atol=1e-4)

  def test_errors(self):
    params, obj_fn = quadratic_problem()
    mesh_2d = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2),
                                ('q', 'data'))
    with self.assertRaisesRegex(ValueError, 'name the one'):
      zojax.rge(8, 1e-2, mesh=mesh_2d)
    with self.assertRaisesRegex(ValueError, 'not an axis'):
      zojax.rge(8, 1e-2, mesh=mesh_2d, query_axis='batch')
    with self.assertRaisesRegex(ValueError, 'without a mesh'):
      zojax.cge(1e-2, query_axis='q')
    tx = zojax.rge(6, 1e-2, mesh=_mesh(4))
    with self.assertRaisesRegex(ValueError, 'do not split evenly'):
      tx.update(None, tx.init(params), params, obj_fn=obj_fn)


# Splitting the batch changes the summation order of the mean loss (relative
# error ~1e-7 on a loss of ~10); a finite difference divides that by sigma =
# 1e-2, so estimates agree to ~1e-4 relative, ~1e-3 absolute. A wrong
# reduction (a sum instead of a mean, a missing shard) is off by O(1).
DATA_TOL = {'rtol': 1e-3, 'atol': 2e-3}


class DataParallelTest(parameterized.TestCase):
  """The batch split over a data axis, per-query values averaged over it."""

  @parameterized.named_parameters(*((name, name) for name in ESTIMATORS))
  def test_data_axis_matches_whole_batch(self, name):
    params, batch, loss = least_squares_problem()
    make = ESTIMATORS[name]
    reference, reference_info = _estimate(make(), params,
                                          lambda p: loss(p, batch))
    for n in DEVICE_COUNTS:
      update, info = _estimate(
          make(mesh=_mesh(n, ('data',)), data_axis='data'), params, loss,
          batch=batch)
      chex.assert_trees_all_close(update, reference, **DATA_TOL)
      self.assertEqual(info.num_evals, reference_info.num_evals)
      np.testing.assert_allclose(info.value, reference_info.value, rtol=1e-5)

  @parameterized.parameters((2, 4), (4, 2), (8, 1), (1, 8))
  def test_queries_and_data_on_a_2d_mesh(self, query_devices, data_devices):
    params, batch, loss = least_squares_problem()
    mesh = jax.make_mesh((query_devices, data_devices), ('q', 'data'))
    reference, _ = _estimate(zojax.cge(1e-2, num_coords=8, batch_size=2),
                             params, lambda p: loss(p, batch))
    update, _ = _estimate(
        zojax.cge(1e-2, num_coords=8, batch_size=2, mesh=mesh,
                  query_axis='q', data_axis='data'), params, loss, batch=batch)
    chex.assert_trees_all_close(update, reference, **DATA_TOL)

  def test_batch_without_mesh_calls_obj_fn_with_it(self):
    params, batch, loss = least_squares_problem()
    reference, _ = _estimate(zojax.rge(4, 1e-2), params,
                             lambda p: loss(p, batch))
    update, _ = _estimate(zojax.rge(4, 1e-2), params, loss, batch=batch)
    chex.assert_trees_all_close(update, reference, rtol=1e-6)

  @parameterized.parameters('zo_adam', 'zo_sgd_conservative')
  def test_optimizer_trajectory_on_2d_mesh(self, name):
    params, batch, loss = least_squares_problem()
    make = getattr(zojax, name)
    mesh = jax.make_mesh((2, 4), ('q', 'data'))
    reference, reference_state = run_steps(
        make(0.05, num_queries=4, seed=1), params, lambda p: loss(p, batch),
        10)
    sharded, state = run_steps(
        make(0.05, num_queries=4, seed=1, mesh=mesh, query_axis='q',
             data_axis='data'), params, loss, 10, batch=batch)
    chex.assert_trees_all_close(sharded, reference, **DATA_TOL)
    self.assertEqual(zojax.estimate_info(state).num_evals,
                     zojax.estimate_info(reference_state).num_evals)

  def test_a_non_finite_shard_skips_the_step(self):
    params, (inputs, targets), loss = least_squares_problem()
    batch = (inputs, targets.at[-1].set(jnp.nan))  # only the last shard
    tx = zojax.rge(4, 1e-2, mesh=_mesh(4, ('data',)), data_axis='data')
    update, info = _estimate(tx, params, loss, batch=batch)
    self.assertTrue(all(bool(jnp.all(jnp.isnan(u)))
                        for u in jax.tree.leaves(update)))
    self.assertEqual(info.skipped_steps, 1)

  def test_errors(self):
    params, batch, loss = least_squares_problem()
    mesh = jax.make_mesh((2, 4), ('q', 'data'))
    with self.assertRaisesRegex(ValueError, 'without a mesh'):
      zojax.rge(4, 1e-2, data_axis='data')
    with self.assertRaisesRegex(ValueError, 'not an axis'):
      zojax.rge(4, 1e-2, mesh=mesh, query_axis='q', data_axis='batch')
    with self.assertRaisesRegex(ValueError, 'different mesh axes'):
      zojax.rge(4, 1e-2, mesh=mesh, query_axis='q', data_axis='q')
    tx = zojax.rge(4, 1e-2, mesh=mesh, query_axis='q', data_axis='data')
    state = tx.init(params)
    with self.assertRaisesRegex(ValueError, 'batch='):
      tx.update(None, state, params, obj_fn=lambda p: loss(p, batch))
    odd_batch = jax.tree.map(lambda x: x[:6], batch)
    with self.assertRaisesRegex(ValueError, 'divisible'):
      tx.update(None, state, params, obj_fn=loss, batch=odd_batch)
    with self.assertRaisesRegex(ValueError, 'scalar'):
      tx.update(None, state, params, obj_fn=lambda p, b: b[1] * p['x'][0],
                batch=batch)


class HelpersTest(parameterized.TestCase):

  def test_shard_batch_splits_the_leading_axis(self):
    _, batch, _ = least_squares_problem()
    mesh = jax.make_mesh((2, 4), ('q', 'data'))
    placed = zojax.parallel.shard_batch(batch, mesh, 'data')
    chex.assert_trees_all_equal(placed, batch)
    inputs = placed[0]
    self.assertEqual(inputs.sharding.spec, jax.sharding.PartitionSpec('data'))
    self.assertEqual(inputs.addressable_shards[0].data.shape, (4, 12))

  @parameterized.parameters((None, 1), (3, 1), (None, 4), (2, 8))
  def test_evaluate_points_matches_vmap(self, batch_size, devices):
    params, obj_fn = quadratic_problem()
    points = jax.tree.map(
        lambda x: x + jnp.arange(8.0).reshape((8,) + (1,) * x.ndim), params)
    points = jax.tree.map(
        lambda x: jnp.broadcast_to(x, x.shape), points)
    expected = jax.vmap(obj_fn)(points)
    mesh = _mesh(devices) if devices > 1 else None
    values = jax.jit(lambda pts: zojax.parallel.evaluate_points(
        obj_fn, pts, batch_size=batch_size, mesh=mesh))(points)
    chex.assert_shape(values, (8,))
    np.testing.assert_allclose(values, expected, rtol=1e-6)

  def test_evaluate_points_needs_a_divisible_count(self):
    params, obj_fn = quadratic_problem()
    points = jax.tree.map(lambda x: jnp.stack([x] * 6), params)
    with self.assertRaisesRegex(ValueError, 'split evenly'):
      zojax.parallel.evaluate_points(obj_fn, points, mesh=_mesh(4))

  def test_parallelism_defaults_a_1d_mesh_to_queries(self):
    plan = zojax.parallel.parallelism(_mesh(4))
    self.assertEqual((plan.query_axis, plan.data_axis), ('q', None))
    self.assertEqual((plan.query_devices, plan.data_devices), (4, 1))
    self.assertIsNone(zojax.parallel.parallelism(None))
