"""Tests for the one direction generator (zojax._src.query.directions)."""

from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from zojax._src.core import backend
from zojax._src.core import keys
from zojax._src.query import directions

KEY = directions.leaf_key(directions.query_key(keys.key_data(3), 0), 'w')


class GeneratorTest(parameterized.TestCase):

  def test_blocks_layers_and_rows_draw_the_leaf(self):
    shape = (3, 5, 7)
    whole = directions.leaf_normal(KEY, shape)
    chex.assert_shape(whole, shape)
    block = lambda prefix, start, size: directions.block_normal(
        KEY, shape, prefix, start, size, jnp.float32)
    for layer in range(3):  # one slice, as a scan over layers draws it
      np.testing.assert_array_equal(block((layer,), 0, 5), whole[layer])
      np.testing.assert_array_equal(block((layer,), 1, 2),
                                    whole[layer, 1:3])
      np.testing.assert_array_equal(block((layer, 3), 2, 4),
                                    whole[layer, 3, 2:6])  # odd start
    np.testing.assert_array_equal(block((), 1, 2), whole[1:3])
    np.testing.assert_array_equal(block((2, 4, 6), 0, None), whole[2, 4, 6])
    # a traced start (a loop over blocks) draws the same numbers
    traced = jax.jit(lambda s: directions.block_normal(
        KEY, shape, (1,), s, 2, jnp.float32))(3)
    np.testing.assert_array_equal(traced, whole[1, 3:5])
    ids = jnp.array([[2, 0], [2, 1]])  # rows picked by an index array
    np.testing.assert_array_equal(
        directions.row_normal(KEY, (3, 35), ids, jnp.float32),
        whole.reshape(3, 35)[ids])

  def test_vectors_and_scalars(self):
    vector = directions.leaf_normal(KEY, (9,))
    for start, size in ((0, 4), (3, 5), (8, 1)):
      np.testing.assert_array_equal(
          directions.block_normal(KEY, (9,), (), start, size, jnp.float32),
          vector[start:start + size])
    np.testing.assert_array_equal(
        directions.block_normal(KEY, (9,), (4,), 0, None, jnp.float32),
        vector[4])
    scalar = directions.leaf_normal(KEY, ())
    chex.assert_shape(scalar, ())
    np.testing.assert_array_equal(scalar, vector[0])  # entry (0, 0)

  def test_accelerators_compute_the_same_words(self):
    # one Threefry call per word (accelerators) or per pair (CPU): the same
    # stream, for odd and even, static and traced starts and any rows
    rows = jnp.arange(6, dtype=jnp.uint32).reshape(2, 3)
    for start in (0, 1, 2, 7):
      for count in (1, 2, 5, 33):
        by_pair = directions.words_by_pair(KEY, rows, start, count)
        chex.assert_shape(by_pair, (2, 3, count))
        np.testing.assert_array_equal(
            directions.words_by_entry(KEY, rows, start, count), by_pair)
        traced = jax.jit(lambda s, count=count: directions.words_by_entry(
            KEY, jnp.uint32(4), s, count))(start)
        np.testing.assert_array_equal(
            traced, directions.words_by_pair(KEY, jnp.uint32(4), start,
                                             count))

    def draws():  # traced afresh on every call (a new jitted lambda)
      return (directions.leaf_normal(KEY, (3, 5, 7)),
              directions.packed_signs(KEY, (3, 70)),
              jax.jit(lambda s: directions.block_normal(
                  KEY, (3, 5, 7), (1, 3), s, 3, jnp.float32))(1))

    on_cpu = draws()
    with mock.patch.object(backend, 'on_accelerator', lambda: True):
      on_accelerator = draws()
    chex.assert_trees_all_equal(on_accelerator, on_cpu)

  def test_every_entry_is_its_own_draw_and_keys_differ(self):
    # both output words of every Threefry call are used: 4096 distinct words
    # from 2048 calls (normals keep 23 bits, so a collision among them
    # would be chance, not a shared draw)
    words = directions.words(KEY, jnp.arange(64), 0, 64)
    self.assertEqual(np.unique(np.asarray(words)).size, 64 * 64)
    whole = directions.leaf_normal(KEY, (64, 64))
    other_path = directions.leaf_key(
        directions.query_key(keys.key_data(3), 0), 'v')
    other_query = directions.leaf_key(
        directions.query_key(keys.key_data(3), 1), 'w')
    for key in (other_path, other_query):
      self.assertFalse(np.allclose(whole, directions.leaf_normal(key,
                                                                 (64, 64))))

  def test_normals_are_standard(self):
    # 2**18 draws: mean and std within 4 standard errors; the pairs that
    # share a Threefry call are uncorrelated.
    draws = np.asarray(directions.leaf_normal(KEY, (512, 512))).ravel()
    n = draws.size
    self.assertLess(abs(draws.mean()), 4 / np.sqrt(n))
    self.assertLess(abs(draws.std() - 1.0), 4 * np.sqrt(0.5 / n))
    pairs = draws.reshape(-1, 2)
    self.assertLess(abs(np.mean(pairs[:, 0] * pairs[:, 1])),
                    4 / np.sqrt(n / 2))
    fourth = np.mean(draws**4)  # kurtosis of a normal: 3
    self.assertLess(abs(fourth - 3.0), 4 * np.sqrt(96 / n))

  def test_rademacher_signs_are_balanced_and_independent(self):
    signs = np.asarray(directions.leaf_draw(KEY, (200_000,), 'rademacher'))
    n = signs.size
    self.assertTrue(np.all(np.abs(signs) == 1))
    self.assertLess(abs(signs.mean()), 4 / np.sqrt(n))
    for lag in (1, 31, 32, 64):  # inside a word, across words and calls
      self.assertLess(abs(np.mean(signs[lag:] * signs[:-lag])),
                      4 / np.sqrt(n))
    packed = directions.packed_signs(KEY, (4, 70))
    chex.assert_shape(packed, (4, 3))
    np.testing.assert_array_equal(
        directions.unpack_signs(packed, (4, 70)),
        directions.leaf_draw(KEY, (4, 70), 'rademacher'))


if __name__ == '__main__':
  absltest.main()
