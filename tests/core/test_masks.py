"""Tests for zojax.masks."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from zojax import masks


def _params():
  return {
      'Dense_0': {'kernel': jnp.arange(12.0).reshape(3, 4) - 6.0,
                  'bias': jnp.ones(4)},
      'Dense_1': {'kernel': jnp.linspace(-1.0, 1.0, 8).reshape(4, 2),
                  'bias': jnp.zeros(2)},
  }


class MasksTest(absltest.TestCase):

  def test_by_path(self):
    selected = masks.by_path(r'Dense_1')(_params())
    self.assertEqual(selected, {'Dense_0': {'kernel': False, 'bias': False},
                                'Dense_1': {'kernel': True, 'bias': True}})
    kernels = masks.by_path([r'kernel$'])(_params())
    self.assertTrue(kernels['Dense_0']['kernel'])
    self.assertFalse(kernels['Dense_0']['bias'])
    no_bias = masks.by_path('bias', exclude=True)(_params())
    self.assertEqual(no_bias['Dense_1'], {'kernel': True, 'bias': False})

  def test_by_magnitude_keeps_the_requested_fraction(self):
    rng = np.random.default_rng(0)
    params = {'w': jnp.asarray(rng.normal(size=(50, 40)), jnp.float32)}
    small = masks.by_magnitude(0.25)(params)['w']
    large = masks.by_magnitude(0.25, keep='largest')(params)['w']
    self.assertAlmostEqual(float(small.mean()), 0.25, delta=0.01)
    self.assertAlmostEqual(float(large.mean()), 0.25, delta=0.01)
    magnitude = np.abs(np.asarray(params['w']))
    self.assertLess(magnitude[np.asarray(small)].max(),
                    magnitude[np.asarray(large)].min())

  def test_intersect_and_count(self):
    params = _params()
    rule = masks.intersect(masks.by_path('kernel'),
                           masks.by_magnitude(0.5, keep='largest'))
    combined = rule(params)
    self.assertFalse(combined['Dense_0']['bias'])
    self.assertEqual(combined['Dense_0']['kernel'].dtype, jnp.bool_)
    self.assertEqual(masks.count_selected(rule, params),
                     int(combined['Dense_0']['kernel'].sum() +
                         combined['Dense_1']['kernel'].sum()))
    self.assertEqual(masks.count_selected(None, params), 12 + 4 + 8 + 2)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, 'keep_fraction'):
      masks.by_magnitude(0.0)
    with self.assertRaisesRegex(ValueError, 'keep'):
      masks.by_magnitude(0.5, keep='middle')
    with self.assertRaisesRegex(ValueError, 'booleans'):
      masks.count_selected(jax.tree.map(lambda x: x, _params()), _params())


if __name__ == '__main__':
  absltest.main()
