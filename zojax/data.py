"""Real datasets that need no download at run time.

``digits`` is scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10
classes), which ships inside the scikit-learn wheel: a real dataset for
end-to-end accuracy results on a CPU. scikit-learn is an optional dependency
(``pip install zojax[demo]`` or ``[test]``).

``cifar10`` reads the standard CIFAR-10 python-pickle batches from a local
directory (zojax never downloads them).
"""

from __future__ import annotations

import os
import pickle
from typing import NamedTuple

import numpy as np

CIFAR10_FOLDER = 'cifar-10-batches-py'
CIFAR10_TRAIN_FILES = tuple(f'data_batch_{i}' for i in range(1, 6))
CIFAR10_TEST_FILE = 'test_batch'


class Dataset(NamedTuple):
  """A train/test split: images ``(N, H, W, C)`` float32 in [0, 1], int32
  labels ``(N,)``."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray

  @property
  def num_classes(self) -> int:
    return int(max(self.y_train.max(), self.y_test.max())) + 1


def digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
  """scikit-learn's digits as ``(N, 8, 8, 1)`` images, split at random.

  Args:
    test_fraction: fraction of the 1,797 examples held out for testing.
    seed: seed of the (numpy) shuffle that makes the split.

  Returns:
    A :class:`Dataset`; pixel values are divided by 16 (their maximum).
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f'test_fraction must be in (0, 1), got {test_fraction}.')
  try:
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        'zojax.data.digits needs scikit-learn, which bundles the dataset: '
        'pip install "zojax[demo]" (or scikit-learn).') from e
  bunch = load_digits()
  images = (bunch.images / 16.0).astype(np.float32)[..., None]
  labels = bunch.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(labels))
  num_test = int(round(test_fraction * len(labels)))
  test, train = order[:num_test], order[num_test:]
  return Dataset(images[train], labels[train], images[test], labels[test])


def cifar10(path: str) -> Dataset:
  """CIFAR-10 from the python-pickle batches in a local directory.

  ``path`` is the ``cifar-10-batches-py`` folder of the official archive
  (``cifar-10-python.tar.gz``, extracted) or the folder that contains it. Each
  batch is a pickle of a dict with ``b'data'``, a ``(N, 3072)`` uint8 array
  (the 1,024 red, then green, then blue pixels of each 32x32 image, row by
  row) and ``b'labels'``.

  Args:
    path: where the batches are.

  Returns:
    A :class:`Dataset` with ``(N, 32, 32, 3)`` float32 images in [0, 1]
    (50,000 train, 10,000 test for the full archive).

  Raises:
    FileNotFoundError: naming the expected files, if they are not there.
  """
  folder = path
  if not os.path.exists(os.path.join(folder, CIFAR10_TEST_FILE)):
    folder = os.path.join(path, CIFAR10_FOLDER)
  expected = CIFAR10_TRAIN_FILES + (CIFAR10_TEST_FILE,)
  missing = [name for name in expected
             if not os.path.exists(os.path.join(folder, name))]
  if missing:
    raise FileNotFoundError(
        f'CIFAR-10 batches not found under {path!r}: expected '
        f'{", ".join(expected)} in it or in its {CIFAR10_FOLDER}/ folder '
        f'(missing: {", ".join(missing)}). Download and extract '
        'cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html'
        ' yourself; zojax does not fetch data.')
  x_train, y_train = zip(*(_cifar10_batch(os.path.join(folder, name))
                           for name in CIFAR10_TRAIN_FILES))
  x_test, y_test = _cifar10_batch(os.path.join(folder, CIFAR10_TEST_FILE))
  return Dataset(np.concatenate(x_train), np.concatenate(y_train), x_test,
                 y_test)


def _cifar10_batch(file: str) -> tuple[np.ndarray, np.ndarray]:
  with open(file, 'rb') as f:
    batch = pickle.load(f, encoding='bytes')
  data = np.asarray(batch[b'data'], np.uint8)
  if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
    raise ValueError(f'{file}: expected b"data" of shape (N, 3072), got '
                     f'{data.shape}.')
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  labels = np.asarray(batch[b'labels'], np.int32)
  return (images.astype(np.float32) / 255.0), labels
