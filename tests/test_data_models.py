"""Tests for zojax.data and zojax.models."""

import pickle

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


def _write_cifar_batch(path, images, labels):
  """One batch in the official format: (N, 3072) uint8, channel-major."""
  data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
  with open(path, 'wb') as f:
    pickle.dump({b'data': data, b'labels': list(labels),
                 b'batch_label': b'test'}, f)


def test_cifar10_reads_the_python_pickle_batches(tmp_path):
  folder = tmp_path / 'cifar-10-batches-py'
  folder.mkdir()
  rng = np.random.default_rng(0)
  written = {}
  for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
    images = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=4)
    _write_cifar_batch(folder / name, images, labels)
    written[name] = (images, labels)
  for path in (tmp_path, folder):  # the archive's folder or its parent
    ds = data.cifar10(str(path))
    chex.assert_shape(ds.x_train, (20, 32, 32, 3))
    chex.assert_shape(ds.x_test, (4, 32, 32, 3))
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_allclose(ds.x_train[4:8] * 255.0,
                               written['data_batch_2'][0], atol=1e-3)
    np.testing.assert_array_equal(ds.y_test, written['test_batch'][1])


def test_cifar10_names_the_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='data_batch_1.*test_batch'):
    data.cifar10(str(tmp_path))
