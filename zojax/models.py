"""Small Flax (linen) models used by the demo, tests and experiments."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from zojax._src.quantization import BITS, QuantizedDense, quantize

__all__ = ('BasicBlock', 'BatchStatNorm', 'ConvPool', 'Decoder',
           'DecoderBlock', 'DenseHead', 'MLP', 'QuantizedDense', 'ResNet20',
           'ResNetStem', 'SmallCNN', 'accuracy', 'cross_entropy',
           'next_token_loss', 'num_params', 'quantize')


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


class DecoderBlock(nn.Module):
  """A pre-norm transformer decoder layer: causal multi-head self-attention
  and a GELU MLP, each with a residual connection. With ``quantization``
  ('int8' or 'int4') its four linear layers are :class:`QuantizedDense`."""

  num_heads: int
  d_ff: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  quantization: Optional[str] = None
  group_size: int = 64

  def _dense(self, features: int, name: str) -> nn.Module:
    if self.quantization is None:
      return nn.Dense(features, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=name)
    return QuantizedDense(features, BITS[self.quantization], self.group_size,
                          self.dtype, self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, width = x.shape
    dense = self._dense
    norm = lambda name: nn.LayerNorm(dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    qkv = dense(3 * width, 'qkv')(norm('attn_norm')(x))
    q, k, v = jnp.split(qkv.reshape(batch, length, 3 * self.num_heads, -1), 3,
                        axis=2)
    attended = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x = x + dense(width, 'out')(attended.reshape(batch, length, width))
    hidden = nn.gelu(dense(self.d_ff, 'up')(norm('mlp_norm')(x)))
    return x + dense(width, 'down')(hidden)


class Decoder(nn.Module):
  r"""A decoder-only transformer (GPT/OPT style) with stacked, scanned layers.

  Token and learned position embeddings, ``num_layers`` pre-norm
  :class:`DecoderBlock` s whose parameters are stacked along a leading axis
  (the ``'blocks'`` subtree) and run by ``lax.scan``, a final LayerNorm and
  an output layer tied to the token embedding. About
  :math:`12 L d^2 + (V + T) d` parameters.

  ``__call__(tokens, perturbation=None)``: with a
  :class:`zojax._src.estimators.perturbation.Perturbation` (given by
  :func:`zojax.mezo` to its ``perturbed_fn``), every part is perturbed right
  before it is used, each layer inside the scan, so a MeZO step holds one
  perturbed layer at a time (the memory of inference).

  Attributes:
    vocab_size, num_layers, d_model, num_heads: the usual sizes.
    d_ff: MLP width (default ``4 * d_model``).
    max_len: longest sequence (size of the position table).
    dtype: computation dtype; param_dtype: parameter dtype.
    quantization: ``None``, ``'int8'`` or ``'int4'``: the blocks' linear
      layers hold integer codes and per-group scales, dequantized on the fly
      (:mod:`zojax._src.quantization`; :func:`quantize` converts a float
      decoder's params; :func:`zojax.qzo` fine-tunes the scales).
    group_size: input rows per scale of the quantized layers.
  """

  vocab_size: int = 64
  num_layers: int = 2
  d_model: int = 64
  num_heads: int = 4
  d_ff: Optional[int] = None
  max_len: int = 64
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  quantization: Optional[str] = None
  group_size: int = 64

  @nn.nowrap
  def block(self) -> DecoderBlock:
    return DecoderBlock(self.num_heads, self.d_ff or 4 * self.d_model,
                        self.dtype, self.param_dtype, self.quantization,
                        self.group_size)

  @nn.nowrap
  def _norm(self) -> nn.LayerNorm:
    return nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype)

  @nn.compact
  def __call__(self, tokens: jax.Array, perturbation=None) -> jax.Array:
    probe = jnp.zeros((1, 1, self.d_model), self.dtype)
    embed = self.param('embed', nn.initializers.normal(0.02),
                       (self.vocab_size, self.d_model), self.param_dtype)
    pos = self.param('pos', nn.initializers.normal(0.02),
                     (self.max_len, self.d_model), self.param_dtype)
    blocks = self.param('blocks', lambda k: jax.vmap(
        lambda kl: self.block().init(kl, probe)['params'])(
            jax.random.split(k, self.num_layers)))
    final_norm = self.param('final_norm', lambda k: self._norm().init(
        k, probe)['params'])

    rest = {'embed': embed, 'pos': pos, 'final_norm': final_norm}
    x = self.embed_tokens(rest, tokens, perturbation)

    def layer(x, inputs):
      layer_params, index = inputs
      if perturbation is not None:
        layer_params = perturbation.layer(layer_params, 'blocks', index)
      return self.apply_layer(layer_params, x), None

    x, _ = jax.lax.scan(layer, x, (blocks, jnp.arange(self.num_layers)))
    return self.logits(rest, x, perturbation)

  # The three parts of the forward, as functions of explicit params (the
  # non-stacked ``rest``, one layer's params): what a streaming step that
  # holds one layer at a time (zojax.offload) composes.

  @nn.nowrap
  def embed_tokens(self, rest, tokens: jax.Array, perturbation=None):
    """Token and position embeddings of ``tokens`` (``rest``: the params
    without ``'blocks'``); only the looked-up rows are perturbed."""
    pos = rest['pos']
    if perturbation is None:
      x = jnp.take(rest['embed'], tokens, axis=0)
    else:
      x = perturbation.rows(rest['embed'], 'embed', tokens)
      pos = perturbation.tree(pos, 'pos')
    return (x + pos[:tokens.shape[1]][None]).astype(self.dtype)

  @nn.nowrap
  def apply_layer(self, layer_params, x: jax.Array) -> jax.Array:
    """One decoder layer with its own (unstacked) params."""
    return self.block().apply({'params': layer_params}, x)

  @nn.nowrap
  def logits(self, rest, x: jax.Array, perturbation=None) -> jax.Array:
    """The final norm and the tied output layer."""
    final_norm, embed = rest['final_norm'], rest['embed']
    if perturbation is not None:
      final_norm = perturbation.tree(final_norm, 'final_norm')
    x = self._norm().apply({'params': final_norm}, x)
    if perturbation is None:
      return jnp.einsum('btd,vd->btv', x, embed.astype(self.dtype))
    return perturbation.matmul_transposed(x, embed, 'embed')


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Mean cross-entropy of predicting ``tokens[:, t + 1]`` from
  ``logits[:, t]`` (computed in float32, without copying the logits)."""
  length = tokens.shape[1]
  per_token = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), jnp.roll(tokens, -1, axis=1))
  weights = jnp.arange(length) < length - 1
  return jnp.sum(per_token * weights) / (tokens.shape[0] * (length - 1))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def num_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
