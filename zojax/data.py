"""Small real datasets that need no download.

``digits`` is scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10
classes), which ships inside the scikit-learn wheel: a real dataset for
end-to-end accuracy results on a CPU. scikit-learn is an optional dependency
(``pip install zojax[demo]`` or ``[test]``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


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
