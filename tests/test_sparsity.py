"""Tests for zojax.sparsity (ZO-GraSP layer ratios and random masks)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zojax
from zojax import masks, sparsity


def _quadratic():
  """Params with kernels and a bias; f = ½ θᵀAθ + bᵀθ + |bias|², θ the
  kernels' 16 entries."""
  rng = np.random.default_rng(0)
  g = rng.normal(size=(16, 16))
  a = jnp.asarray(g @ g.T / 16 + np.eye(16), jnp.float32)
  b = jnp.asarray(rng.normal(size=16), jnp.float32)
  params = {'kernel': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            'bias': jnp.asarray(rng.normal(size=(4,)), jnp.float32),
            'other': jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)}

  def obj_fn(p):
    t = jnp.concatenate([p['kernel'].ravel(), p['other'].ravel()])
    return 0.5 * t @ a @ t + b @ t + jnp.sum(p['bias'] ** 2)

  return params, obj_fn


def test_zo_grasp_scores_follow_deepzero_expectation_on_a_quadratic():
  # DeepZero's estimator: E[Hg] = mu^2 D H D g on a quadratic, D = diag(1/d_l)
  # over the perturbed kernels (unit-norm directions per leaf); biases are
  # neither perturbed nor scored.
  params, obj_fn = _quadratic()
  mu = 2.0
  kernels = lambda p: jnp.concatenate([p['kernel'].ravel(),
                                       p['other'].ravel()])
  grad = jax.grad(obj_fn)(params)
  of_kernels = lambda t: obj_fn({**params, 'kernel': t[:12].reshape(3, 4),
                                 'other': t[12:].reshape(2, 2)})
  hessian = jax.jit(jax.hessian(of_kernels))(kernels(params))
  d = jnp.concatenate([jnp.full(12, 1 / 12), jnp.full(4, 1 / 4)])
  expected = -kernels(params) * mu**2 * d * (hessian @ (d * kernels(grad)))
  scores = jax.jit(lambda p: sparsity.zo_grasp_scores(
      obj_fn, p, num_queries=20_000, sigma=mu, seed=3))(params)
  got = kernels(scores)
  assert np.all(np.asarray(scores['bias']) == 0)
  cosine = got @ expected / (jnp.linalg.norm(got) * jnp.linalg.norm(expected))
  assert cosine > 0.98, cosine
  np.testing.assert_allclose(jnp.linalg.norm(got) / jnp.linalg.norm(expected),
                             1.0, atol=0.1)


class _TanhCNN(nn.Module):
  """SmallCNN's layout (two 3x3 convolutions of 8 channels, dense 10) with
  tanh: a smooth objective, whose Hessian finite differences can estimate
  (ReLU's kinks are invisible to autodiff's Hg, not to finite
  differences)."""

  @nn.compact
  def __call__(self, x):
    for channels in (8, 8):
      x = nn.avg_pool(jnp.tanh(nn.Conv(channels, (3, 3))(x)), (2, 2),
                      (2, 2))
    return nn.Dense(10)(x.reshape((x.shape[0], -1)))


def test_cge_grasp_layer_ratios_match_exact_grasp_on_a_cnn():
  ds = zojax.data.digits(test_fraction=0.25, seed=0)
  rows = np.concatenate([np.flatnonzero(ds.y_train == c)[:3]
                         for c in range(10)])
  images, labels = jnp.asarray(ds.x_train[rows]), jnp.asarray(ds.y_train[rows])
  model = _TanhCNN()
  params = model.init(jax.random.PRNGKey(0), images[:1])['params']
  obj_fn = lambda p: zojax.models.cross_entropy(
      model.apply({'params': p}, images), labels)
  grad = jax.grad(obj_fn)
  hg = jax.jit(lambda p: jax.jvp(grad, (p,), (grad(p),))[1])(params)
  exact = jax.tree.map(lambda p, h: -p * h, params, hg)  # Hg: d/de ∇f(θ+eg)
  ratios = lambda s: np.array(jax.tree.leaves(sparsity.layer_sparsity(s, 0.9)))
  scores = jax.jit(lambda p: sparsity.cge_grasp_scores(obj_fn, p))(params)
  np.testing.assert_allclose(ratios(scores), ratios(exact), atol=0.05)
  # Control: magnitude pruning's ratios are further off on this network.
  assert np.max(np.abs(ratios(params) - ratios(exact))) > 0.05


def test_layer_sparsity_prunes_the_smallest_scores_globally():
  scores = {'a': jnp.arange(1.0, 11.0).reshape(2, 5),     # 1..10
            'b': -jnp.arange(11.0, 21.0).reshape(5, 2),   # |.| 11..20
            'bias': jnp.zeros(3)}
  ratios = sparsity.layer_sparsity(scores, 0.25)
  # 5 of 20 included entries pruned: the five smallest |score|, all in 'a'.
  assert ratios == {'a': 0.5, 'b': 0.0, 'bias': None}
  ratios = sparsity.layer_sparsity(scores, 0.75)
  assert ratios['a'] == 1.0 and ratios['b'] == 0.5
  ratios = sparsity.layer_sparsity(scores, 0.5,
                                   include=masks.by_path('^b$'))
  assert ratios == {'a': None, 'b': 0.5, 'bias': None}
  with pytest.raises(ValueError, match='sparsity'):
    sparsity.layer_sparsity(scores, 1.0)


def test_random_mask_honours_the_ratios_and_feeds_cge():
  params, obj_fn = _quadratic()
  ratios = {'kernel': 0.5, 'bias': None, 'other': 0.75}
  mask = sparsity.random_mask(jax.random.PRNGKey(0), params, ratios)
  assert int(mask['kernel'].sum()) == 6 and int(mask['other'].sum()) == 1
  assert mask['bias'] is True
  other = sparsity.random_mask(jax.random.PRNGKey(1), params, ratios)
  assert not np.array_equal(mask['kernel'], other['kernel'])
  # Full CGE over the masked-in coordinates: 6 + 1 + 4 = 11 queries.
  tx = zojax.cge(1e-3, mask=mask, difference='central')
  state = tx.init(params)
  update, state = tx.update(None, state, params, obj_fn=obj_fn)
  assert zojax.estimate_info(state).evals_per_step == 2 * 11
  grad = jax.grad(obj_fn)(params)
  for name in params:
    m = np.broadcast_to(np.asarray(mask[name]), params[name].shape)
    np.testing.assert_allclose(np.asarray(update[name])[m],
                               np.asarray(grad[name])[m], atol=2e-2)
    assert np.all(np.asarray(update[name])[~m] == 0)
