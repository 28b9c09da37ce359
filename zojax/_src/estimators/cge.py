r"""CGE: the coordinate-wise gradient estimator."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from zojax._src.core import checks
from zojax._src.core import keys
from zojax._src.core.base import ZerothOrderTransform
from zojax._src.core.perturbable import Mask, Perturbable
from zojax._src.estimators import directional
from zojax._src.query import engine
from zojax._src.query import probes
from zojax._src.query import sharding


def cge(
    sigma: float,
    *,
    num_coords: Optional[int] = None,
    mask: Mask = None,
    difference: str = 'forward',
    batch_size: Optional[int] = None,
    seed=0,
    mesh: Optional[jax.sharding.Mesh] = None,
    query_axis: Optional[str] = None,
    data_axis: Optional[str] = None,
) -> ZerothOrderTransform:
  r"""Coordinate-wise gradient estimator (CGE) as an optax transform.

  For each perturbed coordinate :math:`j` (unit vector :math:`e_j`),

  .. math::
    \hat g_j = \frac{f(\theta + \sigma e_j) - f(\theta)}{\sigma}
    \quad\text{(forward)},\qquad
    \hat g_j = \frac{f(\theta + \sigma e_j) - f(\theta - \sigma e_j)}{2\sigma}
    \quad\text{(central)},

  and :math:`\hat g_j = 0` for every other coordinate. The error is
  :math:`O(\sigma)` (forward: :math:`\tfrac{\sigma}{2}\partial_j^2 f`) or
  :math:`O(\sigma^2)` (central; exact on quadratics up to rounding).

  Which coordinates:

  * ``num_coords=None``: every coordinate selected by ``mask`` (all by
    default), every step: the deterministic full CGE of DeepZero. The mask
    must then be concrete (not computed from traced values), since the number
    of queries must be known when tracing.
  * ``num_coords=K``: ``K`` distinct coordinates drawn uniformly among the
    masked-in ones afresh every step (randomized block-coordinate estimate;
    multiply by :math:`d/K` for an unbiased estimate of the full gradient).
    If the mask leaves fewer than ``K`` coordinates, the surplus queries
    perturb nothing and contribute zero (they are still counted).

  A step costs ``n + 1`` evaluations (forward) or ``2n`` (central), ``n`` the
  number of coordinates. Queries run in ``vmap`` chunks of ``batch_size``.
  ``ask``/``tell`` and non-finite values work as for :func:`zojax.rge`.

  Args:
    sigma: finite-difference step (> 0): a float, an optax schedule or a
      traced value.
    num_coords: coordinates sampled per step, or ``None`` for all of them.
    mask: which coordinates may be perturbed (see :mod:`zojax.masks`): a
      pytree of bools / bool arrays like ``params`` or a callable
      ``params -> mask`` (e.g. ``zojax.masks.by_path('Dense_1')``).
    difference: ``'forward'`` or ``'central'``.
    batch_size: coordinates evaluated at once; ``None`` = all at once.
    seed: an integer or a PRNG key (used to sample coordinates).
    mesh, query_axis, data_axis: split each step's coordinates and/or the
      batch over mesh axes, as in :func:`zojax.rge` (the number of
      coordinates must be a multiple of the query axis size).

  Returns:
    A :class:`zojax.ZerothOrderTransform`; its ``update`` needs ``obj_fn``.

  References:
    Chen et al., DeepZero: Scaling up Zeroth-Order Optimization for Deep Model
    Training, ICLR 2024.
  """
  checks.validate_positive_int('num_coords', num_coords, allow_none=True)
  num_coords = checks.as_int(num_coords)

  def count_directions(space: Perturbable) -> int:
    total = sum(space.sizes)
    if num_coords is None:
      return int(_static_active_coordinates(space).size)
    if num_coords > total:
      raise ValueError(
          f'num_coords={num_coords} exceeds the {total} coordinates that can '
          'be perturbed.')
    return num_coords

  def make_directions(step_key: jax.Array, space: Perturbable):
    if num_coords is None:
      coords = jnp.asarray(_static_active_coordinates(space))
    else:
      coords = _sample_coordinates(step_key, space, num_coords)
    offsets = np.cumsum((0,) + space.sizes[:-1])

    def local_index(coordinate, size, offset):
      """Index of a flat coordinate inside one leaf, or ``size`` if outside."""
      local = coordinate - offset
      return jnp.where((local >= 0) & (local < size), local, size)

    def expand(coordinate):
      onehots = [
          (jnp.arange(size, dtype=jnp.int32) == coordinate - offset)
          .astype(jnp.float32).reshape(shape)
          for size, offset, shape in zip(space.sizes, offsets, space.shapes)
      ]
      return space.apply_mask(onehots)

    def accumulate(accumulated, coefficients, coordinates):
      out = []
      for acc, size, offset, shape, m in zip(accumulated, space.sizes, offsets,
                                             space.shapes, space.masks):
        index = local_index(coordinates, size, offset)
        weights = coefficients
        if m is not True:  # a masked-out coordinate contributes nothing
          weights = weights * jnp.ravel(m).at[index].get(
              mode='fill', fill_value=False)
        flat = acc.reshape(-1).at[index].add(weights, mode='drop')
        out.append(flat.reshape(shape))
      return tuple(out)

    return engine.Directions(int(coords.shape[0]), lambda i: coords[i], 1.0,
                             space, expand, accumulate)

  checks.validate_choice('difference', difference, probes.DIFFERENCES)
  return directional.direction_transform(
      'cge', make_directions=make_directions,
      count_directions=count_directions,
      probing=directional.FiniteDifferences(difference), sigma=sigma,
      mask=mask, batch_size=batch_size, seed=seed,
      plan=sharding.parallelism(mesh, query_axis, data_axis))


def _static_active_coordinates(space: Perturbable) -> np.ndarray:
  """Flat indices of all masked-in coordinates (needs concrete masks)."""
  indices, offset = [], 0
  for size, m in zip(space.sizes, space.masks):
    if m is True:
      indices.append(np.arange(offset, offset + size))
    elif isinstance(m, jax.core.Tracer):
      raise ValueError(
          'cge(num_coords=None) evaluates every masked-in coordinate, so it '
          'needs a concrete mask; this mask depends on traced values. '
          'Compute the mask once outside jit (e.g. mask = '
          'zojax.masks.by_magnitude(...)(params)) or pass num_coords.')
    else:
      indices.append(offset + np.flatnonzero(np.asarray(m)))
    offset += size
  return np.concatenate(indices).astype(np.int32)


def _sample_coordinates(key: jax.Array, space: Perturbable,
                        num_coords: int) -> jax.Array:
  """``num_coords`` distinct flat indices, uniform among masked-in ones."""
  scores = jax.random.uniform(keys.typed(key), (sum(space.sizes),))
  if space.has_elementwise_mask:
    masked_in = jnp.concatenate(
        [jnp.broadcast_to(jnp.asarray(m), shape).reshape(-1)
         for m, shape in zip(space.masks, space.shapes)])
    scores = jnp.where(masked_in, scores, -1.0)
  return jax.lax.top_k(scores, num_coords)[1].astype(jnp.int32)
