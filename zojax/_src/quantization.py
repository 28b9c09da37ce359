r"""Weight-only quantized linear layers (int8, int4) with per-group scales.

A kernel :math:`W \in R^{n \times m}` is stored as integer codes :math:`Q`
and per-group scales :math:`\Delta`: with groups of ``group_size``
consecutive input rows,

.. math::
  W_{jk} = \Delta_{\lfloor j/g \rfloor, k}\, Q_{jk}, \qquad
  Q = \operatorname{round}(W / \Delta) \in [-2^{b-1}+1, 2^{b-1}-1],
  \qquad \Delta_{\cdot k} = \max_{j \in \text{group}} |W_{jk}| /
  (2^{b-1}-1)

(symmetric absmax quantization). int8 codes take one byte each; int4 codes
are packed two per byte along the input axis (``codes`` then has ``n / 2``
rows). The layer dequantizes on the fly, inside the layer, so a model holds
its codes and scales and at most one layer's float kernel transiently. The
scales are the leaves QZO trains (:func:`zojax.qzo`); their name, ``qscale``,
keeps them apart from LayerNorm's ``scale``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

BITS = {'int8': 8, 'int4': 4}


def _levels(bits: int) -> int:
  return 2 ** (bits - 1) - 1


def pack_int4(codes: jax.Array) -> jax.Array:
  """Pairs of consecutive rows of int4 codes (in [-8, 7]) in one int8 row:
  row ``2i`` in the low nibble, ``2i + 1`` in the high one."""
  low, high = codes[0::2].astype(jnp.int8), codes[1::2].astype(jnp.int8)
  return (low & jnp.int8(0x0F)) | (high << 4)


def unpack_int4(packed: jax.Array) -> jax.Array:
  """The int8 codes of :func:`pack_int4` (sign-extended nibbles)."""
  low = (packed << 4) >> 4     # arithmetic shifts sign-extend
  high = packed >> 4
  return jnp.stack([low, high], axis=1).reshape(
      (2 * packed.shape[0],) + packed.shape[1:])


def quantize_kernel(kernel: jax.Array, bits: int, group_size: int,
                    scale_dtype=jnp.float32) -> dict:
  """``{'codes', 'qscale'}`` of a float kernel ``(n, m)`` (absmax per group
  of ``group_size`` input rows)."""
  n, m = kernel.shape
  if n % group_size or (bits == 4 and group_size % 2):
    raise ValueError(f'the input size {n} must be a multiple of group_size '
                     f'{group_size} (even for int4).')
  grouped = kernel.astype(jnp.float32).reshape(n // group_size, group_size, m)
  scale = jnp.max(jnp.abs(grouped), axis=1) / _levels(bits)
  scale = jnp.where(scale > 0, scale, 1.0)
  codes = jnp.clip(jnp.round(grouped / scale[:, None]), -_levels(bits),
                   _levels(bits)).astype(jnp.int8).reshape(n, m)
  if bits == 4:
    codes = pack_int4(codes)
  return {'codes': codes, 'qscale': scale.astype(scale_dtype)}


def dequantize_kernel(codes: jax.Array, qscale: jax.Array,
                      bits: int) -> jax.Array:
  """:math:`W = \\Delta \\odot Q` (float32)."""
  if bits == 4:
    codes = unpack_int4(codes)
  groups = qscale.shape[0]
  grouped = codes.astype(jnp.float32).reshape(groups, -1, codes.shape[-1])
  return (grouped * qscale.astype(jnp.float32)[:, None]).reshape(codes.shape)


class QuantizedDense(nn.Module):
  """``x @ (qscale * codes) + bias`` with the kernel dequantized on the fly.

  Attributes:
    features: output size.
    bits: 8 or 4.
    group_size: input rows sharing one scale.
    dtype: computation dtype; param_dtype: of the scales and the bias.
  """

  features: int
  bits: int = 8
  group_size: int = 64
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n = x.shape[-1]

    def init_codes(key):  # a random float init, quantized
      kernel = nn.initializers.lecun_normal()(key, (n, self.features))
      return quantize_kernel(kernel, self.bits, self.group_size)['codes']

    codes = self.param('codes', init_codes)
    qscale = self.param('qscale', lambda k: jnp.full(
        (n // self.group_size, self.features), 0.02 / _levels(self.bits),
        self.param_dtype))
    bias = self.param('bias', nn.initializers.zeros, (self.features,),
                      self.param_dtype)
    kernel = dequantize_kernel(codes, qscale, self.bits).astype(self.dtype)
    return x.astype(self.dtype) @ kernel + bias.astype(self.dtype)


def quantize(params: Any, quantization: str, group_size: int = 64) -> Any:
  """A float :class:`zojax.models.Decoder`'s params as the params of the same
  decoder with ``quantization=`` (its blocks' Dense kernels quantized, every
  other leaf kept). Stacked kernels ``(L, n, m)`` are quantized per layer."""
  bits = BITS[quantization]

  def convert(tree):
    if isinstance(tree, dict) and 'kernel' in tree:
      kernel = tree['kernel']
      quantized = (jax.vmap(lambda k: quantize_kernel(
          k, bits, group_size, kernel.dtype))(kernel) if kernel.ndim == 3
                   else quantize_kernel(kernel, bits, group_size,
                                        kernel.dtype))
      rest = {k: v for k, v in tree.items() if k != 'kernel'}
      return {**rest, **quantized}
    if isinstance(tree, dict):
      return {k: convert(v) for k, v in tree.items()}
    return tree

  return {**params, 'blocks': convert(params['blocks'])}
