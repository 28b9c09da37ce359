"""Tests for zojax.mezo, its seeded noise, the Decoder and Sparse MeZO masks."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest
from absl.testing import parameterized

import zojax
from zojax import masks
from zojax import models
from zojax._src.core.perturbable import leaf_paths
from zojax._src.estimators import perturbation
from zojax._src.query import directions

SIGMA = 1e-3
LR = 1e-2


def _decoder(**kwargs):
  config = dict(vocab_size=16, num_layers=3, d_model=8, num_heads=2,
                max_len=8)
  config.update(kwargs)
  model = models.Decoder(**config)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 16)
  params = model.init(jax.random.PRNGKey(1), tokens)['params']
  return model, params, tokens


def _objectives(model, tokens):
  obj_fn = lambda p: models.next_token_loss(
      model.apply({'params': p}, tokens), tokens)
  perturbed_fn = lambda p, q: models.next_token_loss(
      model.apply({'params': p}, tokens, perturbation=q), tokens)
  return obj_fn, perturbed_fn


def _stored_z(params, step_key, query=0):
  """Query ``query``'s z of a step, drawn whole and stored."""
  key = directions.query_key(step_key, query)
  return {path: perturbation.leaf_noise(key, path, leaf)
          for path, leaf in zip(leaf_paths(params), jax.tree.leaves(params))}


def _shift(params, z, scale):
  leaves = [leaf + scale * z[path] for path, leaf in
            zip(leaf_paths(params), jax.tree.leaves(params))]
  return jax.tree.unflatten(jax.tree.structure(params), leaves)


class MapBlocksTest(parameterized.TestCase):

  @parameterized.parameters((1, 0), (16, 0), (16, 2), (1 << 20, 0))
  def test_map_blocks_covers_every_entry_once(self, block_size, axis):
    array = jnp.arange(4 * 6 * 5, dtype=jnp.float32).reshape(4, 6, 5)
    seen = []

    def fn(block, prefix, start):
      del start
      seen.append((tuple(prefix), block.shape))
      return block + 1000.0

    out = perturbation.map_blocks(fn, array, block_size=block_size,
                                  axis=axis)
    np.testing.assert_array_equal(out, array + 1000.0)
    self.assertTrue(all(math.prod(shape) <= max(block_size, 5)
                        for _, shape in seen) or axis == 2)


  def test_stacked_leaf_is_rewritten_without_a_copy_of_a_layer(self):
    # blocks are sliced from the stacked array itself: the temporaries are
    # one block's (4 KiB), not a layer's (256 KiB)
    stacked = jnp.zeros((4, 256, 256), jnp.float32)
    rewrite = jax.jit(lambda a: perturbation.map_blocks(
        lambda block, prefix, start: block * 2.0 + 1.0, a, block_size=1024),
                      donate_argnums=0)
    compiled = rewrite.lower(stacked).compile()
    layer_bytes = 256 * 256 * 4
    self.assertLess(compiled.memory_analysis().temp_size_in_bytes,
                    layer_bytes // 8)
    np.testing.assert_array_equal(compiled(jnp.zeros_like(stacked)), 1.0)


class _small_blocks:
  """Blocks of ``size`` entries whatever the model size, so the blocked
  loops of the update run on tiny models."""

  def __init__(self, size):
    self.size = size

  def __enter__(self):
    self.saved = (perturbation.BLOCK_ELEMENTS,
                  perturbation.MIN_BLOCK_ELEMENTS)
    perturbation.BLOCK_ELEMENTS = perturbation.MIN_BLOCK_ELEMENTS = self.size

  def __exit__(self, *exc):
    perturbation.BLOCK_ELEMENTS, perturbation.MIN_BLOCK_ELEMENTS = self.saved


class MeZOTest(parameterized.TestCase):

  @parameterized.parameters('obj_fn', 'perturbed_fn')
  def test_step_is_minus_lr_projected_grad_times_stored_z(self, objective):
    model, params, tokens = _decoder()
    obj_fn, perturbed_fn = _objectives(model, tokens)
    sigma = 1e-2  # the explicit g below rounds like the step's
    tx = zojax.mezo(LR, sigma, weight_decay=0.1)
    state = tx.init(params)
    kwargs = ({'obj_fn': obj_fn} if objective == 'obj_fn' else
              {'perturbed_fn': perturbed_fn})

    @jax.jit
    def step_and_update(p, s):
      return tx.step(p, s, **kwargs), tx.update(None, s, p, **kwargs)[0]

    # Small blocks: the blocked loops of the update, of Perturbation.tree
    # (obj_fn) and of the layer / embedding / output-layer draws of the
    # Decoder (perturbed_fn) run too.
    with _small_blocks(64):
      (new_params, new_state), updates = step_and_update(params, state)

    _, step_key = jax.random.split(state.key)
    z = _stored_z(params, step_key)
    plus = obj_fn(_shift(params, z, sigma))
    minus = obj_fn(_shift(params, z, -sigma))
    g = (plus - minus) / (2 * sigma)
    for path, old, new, update in zip(
        leaf_paths(params), jax.tree.leaves(params),
        jax.tree.leaves(new_params), jax.tree.leaves(updates)):
      decay = 0.0 if any(s in path for s in ('bias', 'scale')) else 0.1
      change = -LR * (g * z[path] + decay * old)
      np.testing.assert_allclose(new - old, change, rtol=1e-3, atol=1e-7,
                                 err_msg=path)
      np.testing.assert_allclose(update, change, rtol=1e-3, atol=1e-7,
                                 err_msg=path)
    info = zojax.estimate_info(new_state)
    self.assertEqual(info.num_evals, 2)
    self.assertAlmostEqual(info.value, float((plus + minus) / 2), places=5)

  def test_several_queries_average_their_regenerated_directions(self):
    params = {'w': jnp.linspace(-1.0, 1.0, 12).reshape(4, 3),
              'b': jnp.ones(3)}
    obj_fn = lambda p: (jnp.sum(jnp.sin(p['w']) @ p['b']) +
                        jnp.sum(p['b'] ** 2))
    sigma = 1e-2
    tx = zojax.mezo(LR, sigma, num_queries=3)
    state = tx.init(params)
    new, new_state = jax.jit(lambda p, s: tx.step(p, s, obj_fn=obj_fn))(
        params, state)
    _, step_key = jax.random.split(state.key)
    expected = jax.tree.map(jnp.zeros_like, params)
    for query in range(3):
      z = _stored_z(params, step_key, query)
      g = (obj_fn(_shift(params, z, sigma)) -
           obj_fn(_shift(params, z, -sigma))) / (2 * sigma)
      expected = {k: expected[k] - LR / 3 * g * z[k] for k in params}
    for k in params:
      np.testing.assert_allclose(new[k] - params[k], expected[k], rtol=1e-3,
                                 atol=1e-7)
    self.assertEqual(zojax.estimate_info(new_state).num_evals, 6)

  def test_same_seed_same_trajectory_and_schedule(self):
    params = {'w': jnp.ones((4, 3)), 'b': jnp.zeros(3)}
    obj_fn = lambda p: (jnp.sum(jnp.sin(p['w']) @ p['b']) +
                        jnp.sum(p['b'] ** 2))
    schedule = optax.linear_schedule(LR, 0.0, 2)
    tx = zojax.mezo(schedule, SIGMA, seed=7)
    step = jax.jit(lambda p, s: tx.step(p, s, obj_fn=obj_fn))

    def run(p, num_steps):
      s = tx.init(p)
      for _ in range(num_steps):
        p, s = step(p, s)
      return p, s

    (a, sa), (b, _) = run(params, 3), run(params, 3)
    chex.assert_trees_all_equal(a, b)
    self.assertEqual(int(sa.count), 3)
    # The third step has learning rate 0: it changes nothing.
    chex.assert_trees_all_equal(a, run(params, 2)[0])
    other = zojax.mezo(schedule, SIGMA, seed=8)
    moved, _ = other.step(params, other.init(params), obj_fn=obj_fn)
    self.assertFalse(np.allclose(moved['w'], run(params, 1)[0]['w']))

  def test_sparse_mezo_mask_is_respected(self):
    model, params, tokens = _decoder()
    _, perturbed_fn = _objectives(model, tokens)
    sparse = masks.sparse_mezo(0.75, stacked='blocks')
    thresholds = dict(zip(leaf_paths(params), sparse.per_leaf(params)))
    chex.assert_shape(thresholds['blocks/up/kernel'], (3,))
    chex.assert_shape(thresholds['embed'], ())
    tx = zojax.mezo(LR, SIGMA, mask=sparse)
    step = lambda tx: jax.jit(lambda p, s: tx.step(
        p, s, perturbed_fn=perturbed_fn))(params, tx.init(params))[0]
    new = step(tx)
    selected = sparse(params)
    kernel_mask = selected['blocks']['up']['kernel']
    self.assertAlmostEqual(float(kernel_mask[1].mean()), 0.25, delta=0.01)
    for old, upd, m in zip(jax.tree.leaves(params), jax.tree.leaves(new),
                           jax.tree.leaves(selected)):
      moved = np.asarray(old != upd)
      self.assertFalse(moved[~np.asarray(m)].any())  # large weights frozen
      self.assertTrue(moved[np.asarray(m)].mean() > 0.99)
    # the earlier spelling sparse_mezo(params, sparsity) still works
    self.assertEqual(masks.sparse_mezo(params, 0.75).sparsity, 0.75)

  def test_sparse_mezo_keeps_its_fraction_along_a_run(self):
    # With a large learning rate the small weights random-walk past any
    # fixed threshold; the per-step threshold keeps selecting 1 - sparsity
    # of every layer (Sparse MeZO's rule) at step 1 and at step 1,000.
    rng = np.random.default_rng(0)
    params = {'w': jnp.asarray(rng.normal(size=(40, 50)), jnp.float32),
              'v': jnp.asarray(rng.normal(size=(300,)), jnp.float32)}
    obj_fn = lambda p: jnp.sum(p['w'] ** 2) + jnp.sum(jnp.cos(p['v']))
    sparse = masks.sparse_mezo(0.75)
    tx = zojax.mezo(1e-3, 1e-2, mask=sparse)
    step = jax.jit(lambda p, s: tx.step(p, s, obj_fn=obj_fn))

    def updated_fraction(p, s):
      new, s = step(p, s)
      moved = [np.asarray(a != b).mean() for a, b in
               zip(jax.tree.leaves(p), jax.tree.leaves(new))]
      return new, s, moved

    state, start = tx.init(params), params
    params, state, first = updated_fraction(params, state)
    for _ in range(998):
      params, state = step(params, state)
    _, _, last = updated_fraction(params, state)
    np.testing.assert_allclose(first, 0.25, atol=0.01)
    np.testing.assert_allclose(last, 0.25, atol=0.01)
    # the selected set moved with the weights: more than a quarter of each
    # layer has been updated at some step
    ever = [np.asarray(a != b).mean() for a, b in
            zip(jax.tree.leaves(start), jax.tree.leaves(params))]
    self.assertTrue(all(f > 0.26 for f in ever), ever)

  def test_frozen_leaves_and_optax_chain(self):
    params = {'head': {'w': jnp.ones((3, 2))}, 'body': {'w': jnp.ones(3)}}
    obj_fn = lambda p: jnp.sum(p['head']['w'] ** 2) + jnp.sum(p['body']['w'])
    tx = zojax.mezo(LR, SIGMA, mask=masks.by_path('head'))
    updates, _ = tx.update(None, tx.init(params), params, obj_fn=obj_fn)
    self.assertFalse(np.asarray(updates['body']['w']).any())
    self.assertTrue(np.asarray(updates['head']['w']).all())
    chained = optax.chain(tx, optax.clip_by_global_norm(1e-4))
    updates, _ = chained.update(None, chained.init(params), params,
                                obj_fn=obj_fn)
    self.assertLessEqual(float(optax.tree.norm(updates)), 1.0001e-4)

  def test_blockwise_cycles_through_the_layers_then_the_rest(self):
    params = {'blocks': {'w': jnp.ones((3, 4)), 'b': jnp.ones(3)},
              'head': jnp.ones(2)}
    obj_fn = lambda p: (jnp.sum(jnp.sin(p['blocks']['w'])) +
                        jnp.sum(p['blocks']['b'] ** 2) + jnp.sum(p['head']))
    tx = zojax.mezo(LR, SIGMA, blockwise='blocks')
    step = jax.jit(lambda p, s: tx.step(p, s, obj_fn=obj_fn))
    state = tx.init(params)
    for t in range(5):  # 3 layers, then the head, then layer 0 again
      new, state = step(params, state)
      moved_w = np.asarray(new['blocks']['w'] != params['blocks']['w'])
      moved_b = np.asarray(new['blocks']['b'] != params['blocks']['b'])
      layer = t % 4
      self.assertEqual(moved_w.any(axis=1).tolist(),
                       [i == layer for i in range(3)])
      self.assertEqual(moved_b.tolist(), [i == layer for i in range(3)])
      self.assertEqual(bool(np.asarray(new['head'] != params['head']).all()),
                       layer == 3)
      params = new
    with self.assertRaisesRegex(ValueError, 'one leading size'):
      zojax.mezo(LR, blockwise='.').init(params)

  def test_non_finite_loss_changes_nothing(self):
    params = {'w': jnp.ones(3)}
    tx = zojax.mezo(LR, SIGMA, weight_decay=0.1)
    bad = lambda p: jnp.log(-jnp.sum(p['w']))
    new, state = tx.step(params, tx.init(params), obj_fn=bad)
    chex.assert_trees_all_equal(new, params)
    self.assertEqual(zojax.estimate_info(state).skipped_steps, 1)
    updates, state = tx.update(None, state, params, obj_fn=bad)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
    self.assertEqual(zojax.estimate_info(state).skipped_steps, 2)

  def test_same_seed_draws_the_same_z_as_rge(self):
    # One generator for every method: mezo's step and central RGE with one
    # Gaussian query draw the same z from the same seed.
    params = {'w': jnp.linspace(-1.0, 1.0, 12).reshape(4, 3),
              'b': jnp.ones(3)}
    obj_fn = lambda p: jnp.sum(jnp.sin(p['w']) @ p['b'])
    mezo = zojax.mezo(1.0, 1e-2, seed=5)
    mezo_update, _ = mezo.update(None, mezo.init(params), params,
                                 obj_fn=obj_fn)
    rge = zojax.rge(1, 1e-2, difference='central', seed=5)
    rge_estimate, _ = rge.update(None, rge.init(params), params,
                                 obj_fn=obj_fn)
    chex.assert_trees_all_close(mezo_update,
                                jax.tree.map(jnp.negative, rge_estimate),
                                rtol=1e-4, atol=1e-6)

  def test_ask_tell_reproduces_the_step(self):
    params = {'w': jnp.linspace(-1.0, 1.0, 12).reshape(4, 3),
              'b': jnp.ones(3)}
    obj_fn = lambda p: jnp.sum(jnp.sin(p['w']) @ p['b'])
    tx = zojax.mezo(LR, 1e-2, num_queries=2, weight_decay=0.1)
    state = tx.init(params)
    want, want_state = tx.update(None, state, params, obj_fn=obj_fn)
    points = tx.ask(state, params)
    chex.assert_tree_shape_prefix(points, (4,))
    values = jax.vmap(obj_fn)(points)
    got, got_state = tx.tell(state, params, points, values)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-7)
    chex.assert_trees_all_equal(got_state.key, want_state.key)
    self.assertEqual(zojax.estimate_info(got_state).num_evals, 4)

  def test_trains_a_regression(self):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
    y = x @ jnp.arange(8.0)
    params = {'w': jnp.zeros(8)}
    loss = lambda p: jnp.mean((x @ p['w'] - y) ** 2)
    tx = zojax.mezo(0.01, SIGMA)
    step = jax.jit(lambda p, s: tx.step(p, s, obj_fn=loss))
    state = tx.init(params)
    for _ in range(300):
      params, state = step(params, state)
    self.assertLess(float(loss(params)), 0.05 * float(loss({'w': jnp.zeros(8)})))

  def test_errors(self):
    model, params, tokens = _decoder()
    obj_fn, perturbed_fn = _objectives(model, tokens)
    for bad in (0.0, -1.0, float('nan')):
      with self.assertRaisesRegex(ValueError, 'sigma'):
        zojax.mezo(LR, bad)
    with self.assertRaisesRegex(ValueError, 'weight_decay'):
      zojax.mezo(LR, weight_decay=-1.0)
    with self.assertRaisesRegex(ValueError, 'num_queries'):
      zojax.mezo(LR, num_queries=0)
    tx = zojax.mezo(LR)
    state = tx.init(params)
    with self.assertRaisesRegex(ValueError, 'exactly one'):
      tx.step(params, state)
    with self.assertRaisesRegex(ValueError, 'exactly one'):
      tx.step(params, state, obj_fn=obj_fn, perturbed_fn=perturbed_fn)
    skip_pos = lambda p, q: perturbed_fn(p, _Skipping(q, 'pos'))
    with self.assertRaisesRegex(ValueError, "never perturbed \\['pos'\\]"):
      tx.step(params, state, perturbed_fn=skip_pos)
    with self.assertRaisesRegex(ValueError, 'not a leaf'):
      tx.step({'decoder': params}, tx.init({'decoder': params}),
              perturbed_fn=lambda p, q: perturbed_fn(p['decoder'], q))
    with self.assertRaisesRegex(ValueError, 'scalar'):
      tx.step(params, state, obj_fn=lambda p: p['pos'])
    with self.assertRaisesRegex(ValueError, "never used \\['pos'\\]"):
      tx.step(params, state, obj_fn=lambda p: obj_fn(dict(p, pos=params['pos'])))
    with self.assertRaisesRegex(ValueError, 'freezes every'):
      zojax.mezo(LR, mask=lambda p: jax.tree.map(lambda _: False, p)).init(
          params)
    with self.assertRaisesRegex(ValueError, 'sparsity'):
      masks.sparse_mezo(1.0)


class _Skipping:
  """A perturbation that leaves one path unperturbed (a buggy objective)."""

  def __init__(self, inner, path):
    self.inner, self.path = inner, path

  def tree(self, params, path=''):
    return params if path == self.path else self.inner.tree(params, path)

  def __getattr__(self, name):
    return getattr(self.inner, name)


class MemoryTest(absltest.TestCase):

  def test_mezo_step_needs_less_than_a_copy_of_the_params(self):
    """XLA's compiled memory analysis on CPU: the donated MeZO step's
    temporaries stay close to inference's and below one copy of the params
    (perturbing the whole tree at once, the obj_fn form, needs about two
    copies: experiments/bench_mezo.py)."""
    model = models.Decoder(vocab_size=256, num_layers=8, d_model=256,
                           num_heads=4, max_len=32)
    tokens = jax.ShapeDtypeStruct((2, 32), jnp.int32)
    params = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))['params'])
    params_bytes = 4 * models.num_params(params)
    loss = lambda p, t: models.next_token_loss(model.apply({'params': p}, t),
                                               t)
    perturbed = lambda p, q, t: models.next_token_loss(
        model.apply({'params': p}, t, perturbation=q), t)
    tx = zojax.mezo(LR, SIGMA)
    state = jax.eval_shape(tx.init, params)

    def temp_bytes(fn, *args, donate=()):
      compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
      return compiled.memory_analysis().temp_size_in_bytes

    inference = temp_bytes(loss, params, tokens)
    step = temp_bytes(lambda p, s, t: tx.step(p, s, perturbed_fn=perturbed,
                                              batch=t),
                      params, state, tokens, donate=(0,))
    self.assertLess(step, params_bytes)
    # One layer's perturbed copy (1/8 of the params) and small blocks.
    self.assertLess(step - inference, 0.2 * params_bytes)


if __name__ == '__main__':
  absltest.main()
