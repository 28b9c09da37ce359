"""Tests for zojax.qzo and the quantized decoder layers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

import zojax
from zojax import models
from zojax._src import quantization
from zojax._src.core.perturbable import leaf_paths
from zojax._src.estimators import perturbation
from zojax._src.query import directions

SIGMA, LR, CLIP = 1e-2, 1e-3, 5.0


def _quantized_decoder(quant='int4', group_size=16):
  config = dict(vocab_size=16, num_layers=2, d_model=32, num_heads=2,
                max_len=8)
  float_model = models.Decoder(**config)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 16)
  params = float_model.init(jax.random.key(1), tokens)['params']
  model = models.Decoder(**config, quantization=quant, group_size=group_size)
  return model, models.quantize(params, quant, group_size), tokens


def _objectives(model, tokens):
  obj_fn = lambda p: models.next_token_loss(
      model.apply({'params': p}, tokens), tokens)
  perturbed_fn = lambda p, q: models.next_token_loss(
      model.apply({'params': p}, tokens, perturbation=q), tokens)
  return obj_fn, perturbed_fn


class QuantizationTest(parameterized.TestCase):

  @parameterized.parameters(4, 8)
  def test_round_trip_is_within_half_a_step(self, bits):
    kernel = jax.random.normal(jax.random.key(0), (64, 24))
    q = quantization.quantize_kernel(kernel, bits, 16)
    self.assertEqual(q['codes'].dtype, jnp.int8)
    chex.assert_shape(q['codes'], (64 // (2 if bits == 4 else 1), 24))
    chex.assert_shape(q['qscale'], (4, 24))
    back = quantization.dequantize_kernel(q['codes'], q['qscale'], bits)
    half_step = jnp.repeat(q['qscale'], 16, axis=0) / 2
    self.assertTrue(bool(jnp.all(jnp.abs(back - kernel) <= half_step * 1.001)))

  def test_int4_packing(self):
    codes = jnp.arange(-7, 8, dtype=jnp.int8)[:14].reshape(14, 1)
    packed = quantization.pack_int4(codes)
    chex.assert_shape(packed, (7, 1))
    np.testing.assert_array_equal(quantization.unpack_int4(packed), codes)

  def test_quantized_decoder_matches_the_float_one(self):
    model, params, tokens = _quantized_decoder('int8', 16)
    float_model = models.Decoder(vocab_size=16, num_layers=2, d_model=32,
                                 num_heads=2, max_len=8)
    float_params = float_model.init(jax.random.key(1), tokens)['params']
    logits = model.apply({'params': params}, tokens)
    reference = float_model.apply({'params': float_params}, tokens)
    np.testing.assert_allclose(logits, reference, atol=0.02)


class QZOTest(parameterized.TestCase):

  @parameterized.parameters('obj_fn', 'perturbed_fn')
  def test_step_is_the_clipped_projected_formula_with_stored_z(self, form):
    model, params, tokens = _quantized_decoder()
    obj_fn, perturbed_fn = _objectives(model, tokens)
    tx = zojax.qzo(LR, SIGMA, clip=CLIP, seed=3)
    state = tx.init(params)
    kwargs = {form: obj_fn if form == 'obj_fn' else perturbed_fn}
    new, new_state = jax.jit(lambda p, s: tx.step(p, s, **kwargs))(params,
                                                                   state)
    _, step_key = jax.random.split(state.key)
    query = directions.query_key(step_key, 0)
    paths = leaf_paths(params)
    z = {path: perturbation.leaf_noise(query, path, leaf)
         for path, leaf in zip(paths, jax.tree.leaves(params))
         if path.endswith('qscale')}
    shift = lambda s: jax.tree.unflatten(jax.tree.structure(params), [
        leaf + s * z[path] if path in z else leaf
        for path, leaf in zip(paths, jax.tree.leaves(params))])
    d = (obj_fn(shift(SIGMA)) - obj_fn(shift(-SIGMA))) / (2 * SIGMA)
    d = jnp.clip(d, -CLIP, CLIP)
    for path, old, got in zip(paths, jax.tree.leaves(params),
                              jax.tree.leaves(new)):
      if path in z:
        np.testing.assert_allclose(got, jnp.maximum(old - LR * d * z[path],
                                                    0), rtol=1e-4,
                                   atol=1e-7, err_msg=path)
      else:  # codes (int8) and every other float leaf are frozen
        np.testing.assert_array_equal(got, old, err_msg=path)
    self.assertEqual(zojax.estimate_info(new_state).num_evals, 2)

  def test_codes_frozen_scales_nonnegative_and_steps_clipped(self):
    model, params, tokens = _quantized_decoder('int4')
    _, perturbed_fn = _objectives(model, tokens)
    clip, lr = 0.5, 5e-3  # a large rate: the projection is active
    tx = zojax.qzo(lr, SIGMA, clip=clip, seed=1)
    step = jax.jit(lambda p, s: tx.step(p, s, perturbed_fn=perturbed_fn))
    state, current = tx.init(params), params
    for _ in range(20):
      new, state = step(current, state)
      for path, old, cur in zip(leaf_paths(params), jax.tree.leaves(current),
                                jax.tree.leaves(new)):
        if path.endswith('codes'):
          np.testing.assert_array_equal(cur, old)
        if path.endswith('qscale'):
          self.assertTrue(bool(jnp.all(cur >= 0)))
          # |change| <= lr * clip * |z| entrywise, and projection only shrinks
          moved = np.abs(np.asarray(cur - old))
          self.assertLessEqual(float(moved.max()), lr * clip * 6.0)
      current = new
    scales = [x for p, x in zip(leaf_paths(params), jax.tree.leaves(current))
              if p.endswith('qscale')]
    self.assertTrue(any(bool(jnp.any(s == 0)) for s in scales))

  def test_fine_tunes_a_quantized_model(self):
    model, params, tokens = _quantized_decoder('int8')
    obj_fn, perturbed_fn = _objectives(model, tokens)
    tx = zojax.qzo(2e-3, SIGMA, clip=100.0, num_queries=4, seed=0)
    step = jax.jit(lambda p, s: tx.step(p, s, perturbed_fn=perturbed_fn))
    state, start = tx.init(params), float(obj_fn(params))
    for _ in range(150):
      params, state = step(params, state)
    self.assertLess(float(obj_fn(params)), start - 0.05)

  def test_errors(self):
    model, params, tokens = _quantized_decoder()
    with self.assertRaisesRegex(ValueError, 'clip'):
      zojax.qzo(LR, clip=0.0)
    float_params = {'w': jnp.ones(3)}
    with self.assertRaisesRegex(ValueError, 'freezes every parameter'):
      zojax.qzo(LR, clip=1.0).init(float_params)
    with self.assertRaisesRegex(ValueError, 'floating-point'):
      zojax.mezo(LR).init(params)  # MeZO does not take integer codes


if __name__ == '__main__':
  absltest.main()
