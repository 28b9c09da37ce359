"""Query sharding over a device mesh (``mesh=``/``query_axis=``).

The same seed must give the same estimate on 1, 2, 4 and 8 (simulated CPU)
devices, up to float summation order.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

import zojax
from tests.objectives import quadratic_problem, run_steps

DEVICE_COUNTS = (1, 2, 4, 8)


def _mesh(n, names=('q',)):
  return jax.sharding.Mesh(np.array(jax.devices()[:n]), names)


def _estimate(tx, params, obj_fn):
  state = tx.init(params)
  update, state = jax.jit(lambda s, p: tx.update(None, s, p, obj_fn=obj_fn))(
      state, params)
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
