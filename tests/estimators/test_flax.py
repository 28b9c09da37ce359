"""Tests for zojax.flax: stages of Flax models and feature-reuse CGE.

The contract: feature_reuse_cge gives plain CGE's estimate (same mask) on the
same objective; only the cost differs.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized

import zojax
from zojax import flax as zflax
from zojax import models
from zojax._src.estimators import stages as stages_lib


def _problem(seed=0, batch=32):
  """A SmallCNN as 3 stages on random 8x8 images, cross-entropy loss."""
  modules = models.SmallCNN((2, 4)).stages()
  kx, ky, kp = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(kx, (batch, 8, 8, 1))
  y = jax.random.randint(ky, (batch,), 0, 10)
  params = zflax.init_stages(modules, kp, x)
  stages = zflax.module_stages(modules)
  loss = lambda logits, b: models.cross_entropy(logits, b[1])
  objective = lambda p, b: loss(zflax.apply_stages(stages, p, b[0]), b)
  return stages, loss, objective, params, (x, y)


def _mask(params, seed=1, sparsity=0.8):
  ratios = jax.tree.map(lambda x: sparsity if x.ndim >= 2 else None, params)
  return zojax.sparsity.random_mask(jax.random.PRNGKey(seed), params, ratios)


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


class FeatureReuseCGETest(chex.TestCase, parameterized.TestCase):

  @parameterized.parameters(('forward', None, None), ('central', 7, None),
                            ('forward', 5, 'highest'),
                            ('central', None, 'bfloat16'))
  def test_equals_plain_cge_with_the_same_mask(self, difference, batch_size,
                                               difference_precision):
    stages, loss, objective, params, batch = _problem()
    mask = _mask(params)
    reuse = zflax.feature_reuse_cge(
        stages, loss, 1e-2, mask=mask, difference=difference,
        batch_size=batch_size, difference_precision=difference_precision)
    plain = zojax.cge(1e-2, mask=mask, difference=difference)
    got, state = jax.jit(lambda s, p: reuse.update(
        None, s, p, batch=batch))(reuse.init(params), params)
    want, plain_state = plain.update(None, plain.init(params), params,
                                     obj_fn=objective, batch=batch)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, params)
    scale = np.abs(_flat(want)).max()
    self.assertGreater(scale, 1e-3)
    # float32 rounding of the plain estimate is ~3e-5 here; bfloat16
    # products on the propagated changes cost ~3e-3 relative
    tolerance = 5e-3 if difference_precision == 'bfloat16' else 1e-3
    np.testing.assert_allclose(_flat(got), _flat(want),
                               atol=tolerance * scale)
    # zero exactly where the mask is off
    dense_mask = jax.tree.map(lambda m, p: np.broadcast_to(m, p.shape), mask,
                              params)
    np.testing.assert_array_equal(_flat(got)[~_flat(dense_mask)], 0.0)
    info, plain_info = (zojax.estimate_info(state),
                        zojax.estimate_info(plain_state))
    self.assertEqual(info.num_evals, plain_info.num_evals)
    self.assertAlmostEqual(info.value, plain_info.value, places=4)

  def test_central_estimate_matches_autodiff(self):
    stages, loss, objective, params, batch = _problem(seed=3)
    tx = zflax.feature_reuse_cge(stages, loss, 1e-2, difference='central')
    got, _ = jax.jit(lambda p: tx.update(None, tx.init(p), p,
                                         batch=batch))(params)
    want = jax.grad(objective)(params, batch)
    np.testing.assert_allclose(_flat(got), _flat(want), atol=2e-3)

  def test_update_mask_replaces_the_mask_without_recompiling(self):
    stages, loss, objective, params, batch = _problem()
    first, second = _mask(params, seed=1), _mask(params, seed=2)
    tx = zflax.feature_reuse_cge(stages, loss, 1e-2, mask=first)
    traces = []

    @jax.jit
    def step(p, mask):
      traces.append(1)
      return tx.update(None, tx.init(p), p, batch=batch, mask=mask)[0]

    step(params, first)
    got = step(params, second)
    self.assertLen(traces, 1)
    plain = zojax.cge(1e-2, mask=second)
    want, _ = plain.update(None, plain.init(params), params, obj_fn=objective,
                           batch=batch)
    scale = np.abs(_flat(want)).max()
    np.testing.assert_allclose(_flat(got), _flat(want), atol=1e-3 * scale)
    with self.assertRaisesRegex(ValueError, 'count must stay the same'):
      tx.update(None, tx.init(params), params, batch=batch,
                mask=_mask(params, sparsity=0.5))

  @parameterized.parameters(((4,), ('q',), 'q', None),
                            ((2,), ('d',), None, 'd'),
                            ((2, 4), ('d', 'q'), 'q', 'd'))
  def test_same_estimate_split_over_devices(self, shape, names, query_axis,
                                            data_axis):
    stages, loss, _, params, batch = _problem()
    # BatchStatNorm-free model: a data split leaves every loss term unchanged
    mask = _mask(params)
    single = zflax.feature_reuse_cge(stages, loss, 1e-2, mask=mask,
                                     batch_size=5)
    mesh = jax.sharding.Mesh(
        np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), names)
    split = zflax.feature_reuse_cge(stages, loss, 1e-2, mask=mask,
                                    batch_size=5, mesh=mesh,
                                    query_axis=query_axis,
                                    data_axis=data_axis)
    run = lambda tx: jax.jit(lambda p: tx.update(None, tx.init(p), p,
                                                 batch=batch))(params)
    want, state = run(single)
    got, split_state = run(split)
    scale = np.abs(_flat(want)).max()
    np.testing.assert_allclose(_flat(got), _flat(want), atol=1e-3 * scale)
    self.assertEqual(zojax.estimate_info(split_state).num_evals,
                     zojax.estimate_info(state).num_evals)

  @parameterized.parameters(None, 'highest')
  def test_stage_output_with_a_mask_that_the_params_change(self,
                                                          difference_precision):
    # stage 1 passes on a boolean mask of its output; a coordinate that
    # flips an entry of the mask must change what stage 2 computes
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 4))
    stages = (lambda p, h: (h @ p['w'], h @ p['w'] > 0.0),
              lambda p, h: jnp.where(h[1], h[0], 0.0) @ p)
    loss = lambda h, b: jnp.mean(h ** 2)
    params = ({'w': jax.random.normal(jax.random.PRNGKey(1), (4, 3)) * 1e-2},
              jnp.full((3, 2), 0.5))
    tx = zflax.feature_reuse_cge(stages, loss, 1e-2,
                                 difference_precision=difference_precision)
    got, _ = jax.jit(lambda p: tx.update(None, tx.init(p), p,
                                         batch=(x, None)))(params)
    objective = lambda p, b: loss(zflax.apply_stages(stages, p, b[0]), b)
    plain = zojax.cge(1e-2)
    want, _ = plain.update(None, plain.init(params), params,
                           obj_fn=objective, batch=(x, None))
    scale = np.abs(_flat(want)).max()
    np.testing.assert_allclose(_flat(got), _flat(want), atol=1e-4 * scale)

  def test_trains_in_an_optax_chain(self):
    stages, loss, objective, params, batch = _problem()
    tx = optax.chain(zflax.feature_reuse_cge(stages, loss, 1e-3,
                                             batch_size=64), optax.adam(1e-2))
    state = tx.init(params)

    @jax.jit
    def step(p, s):
      updates, s = tx.update(None, s, p, batch=batch)
      return optax.apply_updates(p, updates), s

    start = float(objective(params, batch))
    for _ in range(20):
      params, state = step(params, state)
    self.assertLess(float(objective(params, batch)), start - 0.2)
    self.assertEqual(zojax.estimate_info(state).num_evals,
                     20 * (models.num_params(params) + 1))

  def test_errors(self):
    stages, loss, _, params, batch = _problem()
    with self.assertRaisesRegex(ValueError, 'sigma'):
      zflax.feature_reuse_cge(stages, loss, 0.0)
    with self.assertRaisesRegex(ValueError, 'non-empty sequence'):
      zflax.feature_reuse_cge((), loss, 1e-2)
    tx = zflax.feature_reuse_cge(stages, loss, 1e-2)
    with self.assertRaisesRegex(ValueError, 'one pytree per stage'):
      tx.init(params[:2])
    with self.assertRaisesRegex(ValueError, 'one pytree per stage'):
      tx.init({'a': params})
    bad = zflax.feature_reuse_cge(stages, lambda h, b: h, 1e-2)
    with self.assertRaisesRegex(ValueError, 'scalar'):
      bad.update(None, bad.init(params), params, batch=batch)
    with self.assertRaisesRegex(ValueError, 'difference_precision'):
      zflax.feature_reuse_cge(stages, loss, 1e-2, difference_precision='f16')
    with self.assertRaisesRegex(ValueError, 'params must be passed'):
      tx.update(None, tx.init(params), batch=batch)


class StagesTest(parameterized.TestCase):

  @parameterized.parameters(
      (models.SmallCNN(), (2, 8, 8, 1),
       ['ConvPool_0', 'ConvPool_1', 'DenseHead_0']),
      (models.ResNet20(), (2, 32, 32, 3),
       ['ResNetStem_0'] + [f'BasicBlock_{i}' for i in range(9)]
       + ['DenseHead_0']))
  def test_stages_compute_the_model(self, model, shape, names):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    variables = model.init(jax.random.PRNGKey(1), x)
    self.assertCountEqual(variables['params'], names)
    staged = tuple(variables['params'][n] for n in names)
    modules = model.stages()
    out = zflax.apply_stages(zflax.module_stages(modules), staged, x)
    np.testing.assert_allclose(out, model.apply(variables, x), atol=1e-6)
    fresh = zflax.init_stages(modules, jax.random.PRNGKey(2), x)
    self.assertEqual(models.num_params(fresh), models.num_params(variables))

  @parameterized.parameters(([16, 16, 43], 64), ([16, 16, 16, 16, 230, 230], 64),
                            ([5, 0, 7], 3), ([4], None), ([0, 0], 8))
  def test_chunk_layout_covers_the_queries_in_order(self, counts, batch_size):
    width, kinds, compositions = stages_lib.chunk_layout(counts, batch_size)
    total = sum(counts)
    if total == 0:
      self.assertEqual((width, kinds.size), (0, 0))
      return
    if batch_size is not None:
      self.assertLessEqual(width, batch_size)
    self.assertLess(kinds.size * width - total, kinds.size)  # pads per chunk
    owners = np.concatenate([
        np.concatenate([np.full(n, position) for position, n in
                        compositions[kind]]) for kind in kinds])
    self.assertEqual(owners.size, kinds.size * width)
    want = np.repeat(np.arange(len(counts)), counts)
    np.testing.assert_array_equal(owners[:total], want)
    np.testing.assert_array_equal(owners[total:], len(counts) - 1)
    self.assertLen(set(compositions), len(compositions))
