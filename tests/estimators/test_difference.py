"""Tests for zojax._src.estimators.difference: f(x + d) - f(x) by propagation."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from zojax import models
from zojax._src.estimators import difference
from zojax._src.estimators.difference import OneHot, propagate


def _every_rule(params, x):
  """Touches each rule: linear ops, bilinear ops, square, division by an
  unchanged value, select, pad, gather, concatenate, nested jit, custom_jvp
  (relu), and fallbacks (max, exp, log, rsqrt, comparisons)."""
  w, b, k = params['w'], params['b'], params['k']
  h = jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  h = jax.nn.relu(h)
  h = jnp.pad(h, ((0, 0), (1, 0), (0, 1), (0, 0)))
  h = h.reshape(h.shape[0], -1)
  h = jnp.concatenate([h, jnp.square(h[:, :3])], axis=1)
  h = jax.jit(lambda a: a @ w + b)(h)
  h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h)) + 1.0)
  h = jnp.where(h > 0.1, h, jnp.exp(h) - 1.0) / 2.0
  h = h[:, jnp.array([0, 2, 1])]
  return jnp.log(1.0 + jnp.mean(jnp.abs(h))) + jnp.max(h)


def _params(key):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  return ({'w': jax.random.normal(k1, (5 * 5 * 2 + 3, 3)) * 0.2,
           'b': jax.random.normal(k2, (3,)),
           'k': jax.random.normal(k3, (3, 3, 1, 2))},
          jax.random.normal(k4, (4, 4, 4, 1)))


class PropagateTest(parameterized.TestCase):

  @parameterized.parameters('highest', 'default', 'bfloat16')
  def test_equals_two_evaluations_subtracted(self, precision):
    params, x = _params(jax.random.PRNGKey(0))
    with jax.enable_x64(True):
      p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
      for leaf in ('w', 'b', 'k'):
        delta = jax.tree.map(jnp.zeros_like, params)
        shape = params[leaf].shape
        middle = tuple(s // 2 for s in shape)
        delta[leaf] = jnp.zeros(shape, jnp.float32).at[middle].set(1e-2)
        value, change = jax.jit(lambda p, d: propagate(
            _every_rule, (p, x), (d, None), precision))(params, delta)
        d64 = jax.tree.map(lambda a: np.asarray(a, np.float64), delta)
        x64 = np.asarray(x, np.float64)
        want = (_every_rule(jax.tree.map(np.add, p64, d64), x64)
                - _every_rule(p64, x64))
        self.assertAlmostEqual(float(value),
                               float(_every_rule(p64, x64)), places=4)
        self.assertGreater(abs(want), 1e-5)
        # float32 rounding of the values (~1e-7 |f|) bounds what any float32
        # difference can resolve; on top, bfloat16 products cost ~3e-3.
        tolerance = 3e-3 if precision == 'bfloat16' else 2e-4
        np.testing.assert_allclose(float(change), float(want),
                                   rtol=tolerance, atol=1e-6)

  def test_change_of_the_input_and_of_params_together(self):
    params, x = _params(jax.random.PRNGKey(1))
    dx = 1e-2 * jax.random.normal(jax.random.PRNGKey(2), x.shape)
    dp = jax.tree.map(lambda a: 1e-2 * jnp.ones_like(a), params)
    _, change = propagate(_every_rule, (params, x), (dp, dx))
    want = (_every_rule(jax.tree.map(jnp.add, params, dp), x + dx)
            - _every_rule(params, x))
    np.testing.assert_allclose(change, want, rtol=1e-3, atol=1e-6)

  def test_resnet_stage_under_vmap(self):
    modules = models.ResNet20(blocks_per_stage=1).stages()
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 32, 32, 3))
    variables = modules[0].init(jax.random.PRNGKey(1), x)
    weights = jax.random.normal(jax.random.PRNGKey(2), (8, 32, 32, 16))
    stem = lambda p: jnp.mean(modules[0].apply({'params': p}, x) * weights)
    params = variables['params']
    kernel = params['Conv_0']['kernel']

    def change(index, one_hot):
      delta = jax.tree.map(jnp.zeros_like, params)
      delta['Conv_0']['kernel'] = (
          OneHot(index, 1e-2, kernel.shape, kernel.dtype) if one_hot else
          jnp.zeros(kernel.size).at[index].set(1e-2).reshape(kernel.shape))
      return propagate(stem, (params,), (delta,))[1]

    got = jax.jit(jax.vmap(lambda i: change(i, False)))(jnp.arange(3))
    # the one-entry convolution rule gives the same changes
    np.testing.assert_allclose(
        jax.jit(jax.vmap(lambda i: change(i, True)))(jnp.arange(3)), got,
        rtol=1e-4, atol=1e-10)
    with jax.enable_x64(True):
      as64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)
      x64, p64 = as64(x), as64(params)
      w64 = np.asarray(weights, np.float64)
      stem64 = lambda p: jnp.mean(modules[0].apply({'params': p}, x64) * w64)
      for i in range(3):
        shifted = as64(params)
        kernel64 = jnp.asarray(p64['Conv_0']['kernel']).reshape(-1)
        shifted['Conv_0'] = {
            'kernel': kernel64.at[i].add(1e-2).reshape(kernel.shape)}
        want = float(stem64(shifted) - stem64(p64))
        self.assertGreater(abs(want), 1e-7)
        np.testing.assert_allclose(got[i], want, rtol=1e-3, atol=1e-10)

  def test_recording_propagates_many_changes_from_one_evaluation(self):
    params, x = _params(jax.random.PRNGKey(3))
    flat, treedef = jax.tree.flatten((params, x))
    k_index = [i for i, leaf in enumerate(flat)
               if leaf.shape == params['k'].shape][0]
    entries = jnp.arange(0, params['k'].size, 3)

    def change_at(recorded, entry):
      deltas = [None] * len(flat)
      deltas[k_index] = OneHot(entry, 1e-2, params['k'].shape, jnp.float32)
      return difference.changes(recorded, deltas)

    recorded = difference.Recording(_every_rule, (params, x))
    got = jax.jit(jax.vmap(lambda e: change_at(recorded, e)))(entries)
    for entry, change in zip(entries, got):
      delta = jax.tree.map(jnp.zeros_like, params)
      delta['k'] = OneHot(entry, 1e-2, params['k'].shape,
                          jnp.float32).dense()
      want = propagate(_every_rule, (params, x), (delta, None))[1]
      np.testing.assert_allclose(change, want, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(recorded.value, _every_rule(params, x),
                               rtol=1e-6)

  def test_changes_do_not_evaluate_the_function_again(self):
    # the value path's sin(x) is recorded; the change of w only multiplies it
    fn = lambda w, x: jnp.sum(jnp.sin(x) @ w)
    w, x = jnp.ones((3, 2)), jnp.ones((4, 3))
    recorded = difference.Recording(fn, (w, x))
    program = jax.make_jaxpr(jax.vmap(
        lambda d: difference.changes(recorded, [d, None])))(
            jnp.ones((5, 3, 2)))
    names = {eqn.primitive.name for eqn in program.jaxpr.eqns}
    self.assertIn('dot_general', names)
    self.assertNotIn('sin', names)
    with self.assertRaisesRegex(ValueError, '1 deltas for 2 flat inputs'):
      difference.changes(recorded, [None])

  def test_errors(self):
    params, x = _params(jax.random.PRNGKey(0))
    with self.assertRaisesRegex(ValueError, 'precision'):
      propagate(_every_rule, (params, x), (None, None), 'float16')
    with self.assertRaisesRegex(ValueError, 'structure'):
      propagate(_every_rule, (params, x), ({'w': params['w']}, None))
    with self.assertRaisesRegex(ValueError, 'deltas for'):
      propagate(_every_rule, (params, x), (None,))


if __name__ == '__main__':
  absltest.main()
