"""Tests for zojax.sparsity (ZO-GraSP layer ratios and random masks)."""

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


def test_zo_grasp_scores_approach_the_true_grasp_score():
  params, obj_fn = _quadratic()
  grad = jax.grad(obj_fn)
  hg = jax.jvp(grad, (params,), (grad(params),))[1]  # exact H g
  exact = jax.tree.map(lambda p, h: -p * h, params, hg)
  scores = sparsity.zo_grasp_scores(obj_fn, params, num_queries=4000,
                                    sigma=1e-3, step=1e-2,
                                    distribution='rademacher', seed=1)
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  cosine = flat(scores) @ flat(exact) / (
      np.linalg.norm(flat(scores)) * np.linalg.norm(flat(exact)))
  assert cosine > 0.95, cosine


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
