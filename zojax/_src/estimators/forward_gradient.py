r"""Forward gradients: the exact directional derivative from a JVP."""

from __future__ import annotations

from typing import Optional

import jax

from zojax._src.core.base import ZerothOrderTransform
from zojax._src.core.perturbable import Mask
from zojax._src.estimators import directional
from zojax._src.estimators.rge import random_direction_transform
from zojax._src.query import sharding


def forward_gradient(
    num_queries: int = 1,
    *,
    distribution: str = 'gaussian',
    mask: Mask = None,
    batch_size: Optional[int] = None,
    seed=0,
    mesh: Optional[jax.sharding.Mesh] = None,
    query_axis: Optional[str] = None,
    data_axis: Optional[str] = None,
) -> ZerothOrderTransform:
  r"""Forward-gradient estimator (the backprop-free first-order baseline).

  .. math::
    \hat g = \frac{1}{q} \sum_{i=1}^{q} (\nabla f(\theta)^\top v_i)\, v_i,
    \qquad v_i \sim N(0, I),

  where :math:`\nabla f(\theta)^\top v_i` is computed *exactly* by one
  forward-mode pass (``jax.jvp``), with no finite-difference error. It is
  unbiased for :math:`\nabla f(\theta)`. Each JVP is counted as one
  evaluation in ``estimate_info`` (it costs about 2-3 forward passes of
  compute and no activation storage). Unlike the other estimators it needs a
  differentiable ``obj_fn``.

  Ask/tell: ``ask`` returns the tangents :math:`v_i` (a pytree like
  ``params`` with a leading axis of ``num_queries``) and ``tell`` takes the
  directional derivatives :math:`\nabla f(\theta)^\top v_i` computed
  elsewhere (any forward-mode AD), one per tangent.

  Args:
    num_queries: directions per step.
    distribution: ``'gaussian'`` (default, as in Baydin et al.),
      ``'rademacher'`` or ``'sphere'`` (scaled by d, as in :func:`zojax.rge`).
    mask: coordinates to perturb (see :mod:`zojax.masks`).
    batch_size: JVPs evaluated at once; ``None`` = all.
    seed: an integer or a PRNG key.
    mesh, query_axis, data_axis: split each step's JVPs and/or the batch over
      mesh axes, as in :func:`zojax.rge`.

  Returns:
    A :class:`zojax.ZerothOrderTransform` needing ``obj_fn``.

  References:
    Baydin et al., Gradients without Backpropagation, 2022; Zhang et al.,
    ZO-Bench, ICML 2024.
  """
  return random_direction_transform(
      'forward_gradient', num_queries, None, distribution=distribution,
      probing=directional.DirectionalDerivatives(), mask=mask,
      batch_size=batch_size, seed=seed,
      plan=sharding.parallelism(mesh, query_axis, data_axis))
