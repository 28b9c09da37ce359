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


class ConvPool(nn.Module):
  """A 3x3 convolution, ReLU and 2x2 average pooling."""

  channels: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Conv(self.channels, (3, 3))(x))
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding='SAME')


class DenseHead(nn.Module):
  """Flattens (or, with ``pool``, averages the spatial axes) and classifies."""

  num_classes: int
  pool: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.pool:
      x = jnp.mean(x, axis=(1, 2))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes)(x)


class SmallCNN(nn.Module):
  """Two 3x3 convolutions (ReLU, 2x2 average pooling) and a dense classifier.

  ``stages()`` gives the same network as a sequence of modules, for
  :mod:`zojax.flax` feature reuse.

  Attributes:
    channels: channels of the two convolutions.
    num_classes: number of outputs.
  """

  channels: Sequence[int] = (8, 16)
  num_classes: int = 10

  @nn.nowrap
  def stages(self) -> tuple[nn.Module, ...]:
    return tuple(ConvPool(c) for c in self.channels) + (
        DenseHead(self.num_classes),)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for stage in self.stages():
      x = stage(x)
    return x


class BatchStatNorm(nn.Module):
  r"""Batch normalization with the statistics of the current batch only.

  :math:`y = \gamma (x - \mu_B) / \sqrt{\sigma_B^2 + \epsilon} + \beta`
  over all axes but the last (channels), i.e. BatchNorm in training mode
  without running averages: the loss stays a pure function of
  ``(params, batch)``, which is what a zeroth-order estimator perturbs (each
  query sees its own batch statistics, as in DeepZero's training). Evaluate
  on batches of a reasonable size (hundreds of images).
  """

  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (channels,))
    bias = self.param('bias', nn.initializers.zeros, (channels,))
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - mean), axis=axes)
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a parameter-free shortcut (He et al.'s
  CIFAR "option A": subsample, then zero-pad the new channels)."""

  channels: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda s: nn.Conv(self.channels, (3, 3), strides=(s, s),
                             padding=1, use_bias=False)
    y = nn.relu(BatchStatNorm()(conv(self.stride)(x)))
    y = BatchStatNorm()(conv(1)(y))
    shortcut = x[:, ::self.stride, ::self.stride, :]
    extra = self.channels - x.shape[-1]
    if extra:
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0),
                                    (extra // 2, extra - extra // 2)))
    return nn.relu(y + shortcut)


class ResNetStem(nn.Module):
  """ResNet-20's first layer: a 3x3 convolution (16 channels), norm, ReLU."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(16, (3, 3), padding=1, use_bias=False)(x)
    return nn.relu(BatchStatNorm()(x))


class ResNet20(nn.Module):
  """ResNet-20 for 32x32 images (He et al., 2016, section 4.2): a 3x3
  convolution with 16 channels, three stages of three basic blocks (16, 32,
  64 channels; stride 2 at the start of stages 2 and 3), global average
  pooling and a dense classifier. 269,722 parameters with 10 classes, the
  model of DeepZero's CIFAR-10 experiments. Normalization is
  :class:`BatchStatNorm`. ``stages()`` gives the same network as 11 modules
  (stem, 9 blocks, head), for :mod:`zojax.flax` feature reuse.
  """

  num_classes: int = 10
  blocks_per_stage: int = 3

  @nn.nowrap
  def stages(self) -> tuple[nn.Module, ...]:
    blocks = []
    for stage, channels in enumerate((16, 32, 64)):
      for block in range(self.blocks_per_stage):
        stride = 2 if stage > 0 and block == 0 else 1
        blocks.append(BasicBlock(channels, stride))
    return (ResNetStem(), *blocks, DenseHead(self.num_classes, pool=True))

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for stage in self.stages():
      x = stage(x)
    return x


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def num_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
