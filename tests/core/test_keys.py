"""Tests for seeds and keys (zojax._src.core.keys)."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from zojax._src.core import keys


class KeysTest(absltest.TestCase):

  def test_every_seed_form_gives_raw_threefry_key_data(self):
    reference = keys.key_data(7)
    self.assertEqual((reference.dtype, reference.shape), (jnp.uint32, (2,)))
    for seed in (np.int64(7), jnp.asarray(7), jnp.asarray(7, jnp.uint32),
                 jax.random.key(7), jax.random.PRNGKey(7)):
      np.testing.assert_array_equal(keys.key_data(seed), reference)
    rbg = keys.key_data(jax.random.key(7, impl='rbg'))
    self.assertEqual((rbg.dtype, rbg.shape), (jnp.uint32, (2,)))

  def test_traced_seed_under_vmap(self):
    batched = jax.vmap(keys.key_data)(jnp.arange(3))
    np.testing.assert_array_equal(batched[2], keys.key_data(2))

  def test_fresh_buffers(self):
    raw = jax.random.PRNGKey(1)
    copy = keys.key_data(raw)
    self.assertIsNot(copy, raw)
    raw.delete()  # the copy survives the seed's buffer being donated
    self.assertEqual(copy.shape, (2,))

  def test_split_and_fold_in_match_jax_random(self):
    typed = jax.random.key(5)
    raw = keys.key_data(5)
    np.testing.assert_array_equal(
        keys.split(raw), jax.random.key_data(jax.random.split(typed)))
    np.testing.assert_array_equal(
        keys.fold_in(raw, 3), jax.random.key_data(jax.random.fold_in(typed,
                                                                     3)))
    next_key, step_key = keys.advance(raw)
    np.testing.assert_array_equal(step_key, keys.step_key(raw))
    self.assertFalse(np.array_equal(next_key, step_key))

  def test_bad_seeds(self):
    for bad in (True, 1.5, 'seed', jnp.zeros(3), jnp.zeros((2, 2), jnp.uint32),
                jax.random.split(jax.random.key(0))):
      with self.assertRaisesRegex(ValueError, 'seed'):
        keys.check_seed(bad)


if __name__ == '__main__':
  absltest.main()
