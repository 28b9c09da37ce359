"""Tests for zojax.data and zojax.models."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zojax import data, models


def test_digits_split_shapes_and_reproducibility():
  ds = data.digits(test_fraction=0.25, seed=0)
  assert ds.x_train.shape[1:] == (8, 8, 1) and ds.x_train.dtype == np.float32
  assert len(ds.x_train) + len(ds.x_test) == 1797
  assert len(ds.x_test) == round(0.25 * 1797)
  assert ds.num_classes == 10
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
  again = data.digits(test_fraction=0.25, seed=0)
  np.testing.assert_array_equal(ds.y_test, again.y_test)
  other = data.digits(test_fraction=0.25, seed=1)
  assert not np.array_equal(ds.y_test, other.y_test)
  with pytest.raises(ValueError, match='test_fraction'):
    data.digits(test_fraction=1.5)


@pytest.mark.parametrize('model', [models.MLP((16, 10)), models.SmallCNN()])
def test_models_produce_logits(model):
  x = jnp.zeros((5, 8, 8, 1))
  params = model.init(jax.random.PRNGKey(0), x)['params']
  logits = model.apply({'params': params}, x)
  chex.assert_shape(logits, (5, 10))
  assert models.num_params(params) > 0
  labels = jnp.arange(5) % 10
  loss = models.cross_entropy(logits, labels)
  np.testing.assert_allclose(loss, np.log(10.0), rtol=0.3)
  assert 0.0 <= float(models.accuracy(logits, labels)) <= 1.0


def test_resnet20_has_the_cifar_architecture():
  model = models.ResNet20()
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 32, 32, 3))
  params = model.init(jax.random.PRNGKey(0), x)['params']
  assert models.num_params(params) == 269_722  # He et al.'s 0.27M
  logits = model.apply({'params': params}, x)
  chex.assert_shape(logits, (6, 10))
  chex.assert_tree_all_finite(logits)


def test_batch_stat_norm_normalizes_each_channel():
  x = 3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(0), (64, 4, 4, 5))
  norm = models.BatchStatNorm()
  params = norm.init(jax.random.PRNGKey(1), x)
  y = norm.apply(params, x)
  np.testing.assert_allclose(jnp.mean(y, axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(jnp.std(y, axis=(0, 1, 2)), 1.0, rtol=1e-3)
