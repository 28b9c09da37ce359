"""Small Flax (linen) models used by the demo, tests and experiments."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


class MLP(nn.Module):
  """A ReLU multilayer perceptron on flattened inputs.

  Attributes:
    features: widths of the layers, the last one being the number of outputs.
  """

  features: Sequence[int] = (32, 10)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    for width in self.features[:-1]:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.features[-1])(x)


class SmallCNN(nn.Module):
  """Two 3x3 convolutions (ReLU, 2x2 average pooling) and a dense classifier.

  Attributes:
    channels: channels of the two convolutions.
    num_classes: number of outputs.
  """

  channels: Sequence[int] = (8, 16)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for c in self.channels:
      x = nn.relu(nn.Conv(c, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding='SAME')
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes)(x)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def num_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
