r"""QZO: zeroth-order fine-tuning of quantized models through their scales."""

from __future__ import annotations

import re
from typing import Optional

import jax
import optax

from zojax._src.core import checks
from zojax._src.core.base import ZerothOrderTransform
from zojax._src.core.masks import by_path
from zojax._src.core.perturbable import Mask
from zojax._src.estimators.mezo_step import Config, build_transform, validate

QUANT_SCALES = r'qscale$'


def qzo(
    learning_rate: optax.ScalarOrSchedule,
    sigma=1e-3,
    *,
    clip,
    num_queries: int = 1,
    scales: str = QUANT_SCALES,
    mask: Mask = None,
    two_point: str = 'fused',
    seed=0,
    mesh: Optional[jax.sharding.Mesh] = None,
    query_axis: Optional[str] = None,
    data_axis: Optional[str] = None,
) -> ZerothOrderTransform:
  r"""Quantized zeroth-order optimization (QZO) of a quantized model.

  A quantized linear layer computes with :math:`W = \Delta \odot Q`: integer
  codes :math:`Q` (int8, or int4 packed two per byte), frozen, and continuous
  per-group scales :math:`\Delta` (:class:`zojax.models.Decoder` with
  ``quantization='int4'|'int8'``; :func:`zojax.models.quantize` builds the
  codes and scales of a trained float decoder). QZO perturbs and trains the
  scales only; one step, with :math:`z_i \sim N(0, I)` over the scales:

  .. math::
    d_i = \operatorname{clip}\Big(\frac{L(\Delta + \epsilon z_i) -
      L(\Delta - \epsilon z_i)}{2\epsilon}, -C, C\Big), \qquad
    \Delta \leftarrow \max\Big(\Delta - \frac{\gamma}{q}\sum_i d_i z_i,
      0\Big),

  :math:`C` = ``clip`` bounding every step's directional derivative (QZO's
  stabiliser for the noisy low-precision forward passes) and the projection
  keeping scales non-negative. Integer leaves are never perturbed nor
  updated; the other float leaves (embeddings, norms) are frozen unless
  ``mask`` selects them (they are then MeZO-updated, without projection).

  Everything else is :func:`zojax.mezo`'s: perturbations regenerated per
  block from the key (never stored), ``update(..., obj_fn=|perturbed_fn=)``
  and the in-place ``step(params, state, ...)``, ``ask``/``tell``, the fused
  or sequential two-point forwards, the ``mesh``/``query_axis``/
  ``data_axis`` parallelism, non-finite steps skipped and counted.

  Args:
    learning_rate: :math:`\gamma`, a float or an optax schedule.
    sigma: :math:`\epsilon`.
    clip: :math:`C` > 0, a float or a schedule.
    num_queries: :math:`q`.
    scales: regex of the scale leaves' paths (perturbed, updated and
      projected onto :math:`\ge 0`); default: the quantized layers'
      ``qscale`` leaves.
    mask: the trained leaves (default: the ``scales`` leaves); integer
      leaves are always frozen.
    two_point: ``'fused'`` or ``'sequential'``, as in :func:`zojax.mezo`.
    seed: an integer or a PRNG key.
    mesh, query_axis, data_axis: as in :func:`zojax.mezo`.

  Returns:
    A :class:`zojax.ZerothOrderTransform` with ``step``.

  References:
    Fine-tuning Quantized Neural Networks with Zeroth-order Optimization
    (QZO), ICLR 2026; Malladi et al., MeZO, NeurIPS 2023.
  """
  plan = validate(learning_rate, sigma, num_queries, two_point, seed, mesh,
                  query_axis, data_axis, 'qzo')
  checks.validate_positive_float('clip', clip)
  pattern = re.compile(scales)
  config = Config(learning_rate, sigma, int(num_queries), 0.0, None,
                  by_path(scales) if mask is None else mask, None, two_point,
                  plan, clip=clip, nonnegative=pattern, name='qzo')
  return build_transform(config, seed)
