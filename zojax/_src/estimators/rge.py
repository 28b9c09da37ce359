r"""RGE: the randomized (vector-wise) gradient estimator."""

from __future__ import annotations

from typing import Optional

import jax

from zojax._src.core import checks
from zojax._src.core.base import ZerothOrderTransform
from zojax._src.core.perturbable import Mask, Perturbable
from zojax._src.estimators import directional
from zojax._src.query import directions as directions_lib
from zojax._src.query import probes
from zojax._src.query import sharding


def rge(
    num_queries: int,
    sigma: float,
    *,
    distribution: str = 'gaussian',
    difference: str = 'forward',
    mask: Mask = None,
    batch_size: Optional[int] = None,
    seed=0,
    mesh: Optional[jax.sharding.Mesh] = None,
    query_axis: Optional[str] = None,
    data_axis: Optional[str] = None,
) -> ZerothOrderTransform:
  r"""Randomized gradient estimator (RGE) as an optax transform.

  With :math:`q` = ``num_queries`` directions :math:`u_i` drawn afresh every
  step and :math:`\sigma` = ``sigma``,

  .. math::
    \hat g = \frac{\phi}{q} \sum_{i=1}^{q}
      \frac{f(\theta + \sigma u_i) - f(\theta)}{\sigma}\, u_i
    \quad\text{(forward)},\qquad
    \hat g = \frac{\phi}{q} \sum_{i=1}^{q}
      \frac{f(\theta + \sigma u_i) - f(\theta - \sigma u_i)}{2\sigma}\, u_i
    \quad\text{(central)}.

  ``distribution`` and the constant :math:`\phi`:

  * ``'gaussian'``: :math:`u \sim N(0, I_d)`, :math:`\phi = 1`. Unbiased for
    :math:`\nabla f_\sigma`, the gradient of the Gaussian smoothing
    :math:`f_\sigma(\theta) = E_u f(\theta + \sigma u)` (Nesterov & Spokoiny).
  * ``'sphere'``: :math:`u` uniform on the unit sphere :math:`S^{d-1}`,
    :math:`\phi = d` (the number of perturbed coordinates, after the mask).
    Unbiased for the gradient of the ball smoothing
    :math:`E_{v \sim U(B^d)} f(\theta + \sigma v)` (Flaxman et al.), since
    :math:`\nabla E_v f(\theta+\sigma v) = (d/\sigma) E_u f(\theta+\sigma u)u`.
  * ``'rademacher'``: :math:`u` uniform on :math:`\{-1, +1\}^d`,
    :math:`\phi = 1` (:math:`E[uu^\top] = I`). The cheapest to generate: 32
    signs come from each random 32-bit word. With ``difference='central'``
    and ``num_queries=1`` this is exactly SPSA (Spall, 1992) with a
    constant perturbation size.

  On a quadratic all three are unbiased for the true gradient (the smoothed
  and the true gradient coincide and odd moments of :math:`u` vanish).

  Directions are regenerated from the step key, query index and leaf path
  (:mod:`zojax._src.query.directions`) and never stored beyond one chunk of
  ``batch_size`` queries. A step costs ``num_queries + 1`` evaluations
  (forward) or ``2 * num_queries`` (central). A non-finite value makes the
  estimate NaN (``optax.apply_if_finite`` downstream skips the step) and is
  counted in ``zojax.estimate_info(state).skipped_steps``.

  Usage::

    tx = optax.chain(zojax.rge(num_queries=16, sigma=1e-3),
                     optax.apply_if_finite(optax.adam(1e-3), 10))
    updates, state = tx.update(None, state, params, obj_fn=obj_fn)

  Ask/tell (objective outside JAX)::

    est = zojax.rge(8, 1e-2)
    state = est.init(params)
    points = est.ask(state, params)        # leading axis: q + 1 (forward)
    values = np.array([f(p) for p in unstack(points)])
    grad, state = est.tell(state, params, points, values)

  Args:
    num_queries: number of directions :math:`q` per step (>= 1).
    sigma: smoothing radius / finite-difference step (> 0): a float, an
      optax schedule of the step count, or a traced value.
    distribution: ``'gaussian'``, ``'sphere'`` or ``'rademacher'``.
    difference: ``'forward'`` or ``'central'``.
    mask: which coordinates to perturb (see :mod:`zojax.masks`): a pytree of
      bools / bool arrays like ``params``, or a callable ``params -> mask``.
      Unperturbed coordinates get a zero update.
    batch_size: directions evaluated at once (``vmap`` chunk); ``None`` = all.
    seed: an integer (also a traced one, e.g. under ``vmap``) or a PRNG
      key; the state keeps raw key data, split every step.
    mesh: optional device mesh (see :mod:`zojax.parallel`). Each step's
      queries are split over its axis ``query_axis`` with ``jax.shard_map``:
      every device regenerates its own directions from the shared key and
      only the summed estimate (one ``psum``) and per-query values cross
      devices. Same seed, same estimate on 1 or N devices (up to float
      summation order). ``num_queries`` must be a multiple of the axis size.
    query_axis: the mesh axis for queries (may be omitted for a 1-D mesh).
    data_axis: optional mesh axis the batch is split over (data
      parallelism). ``update`` then takes ``obj_fn(params, batch)`` and the
      extra argument ``batch=`` (leaves with a leading axis divisible by the
      axis size); each query's value is the mean over the axis of the values
      on the device shards, i.e. the whole-batch objective when ``obj_fn``
      averages over examples. ``batch=`` may also be passed without a mesh.

  Returns:
    A :class:`zojax.ZerothOrderTransform` (an
    ``optax.GradientTransformationExtraArgs`` with ``ask``/``tell``); its
    ``update`` needs ``obj_fn`` (``obj_fn(params)``, or
    ``obj_fn(params, batch)`` when ``batch=`` is passed too).

  References:
    Nesterov & Spokoiny, Random gradient-free minimization of convex
    functions, 2017; Chen et al., DeepZero, ICLR 2024; Malladi et al., MeZO,
    NeurIPS 2023; Spall, SPSA, IEEE TAC 1992.
  """
  checks.validate_choice('difference', difference, probes.DIFFERENCES)
  return random_direction_transform(
      'rge', num_queries, sigma, distribution=distribution,
      probing=directional.FiniteDifferences(difference), mask=mask,
      batch_size=batch_size, seed=seed,
      plan=sharding.parallelism(mesh, query_axis, data_axis))


def random_direction_transform(
    name: str,
    num_queries: int,
    sigma,
    *,
    distribution: str,
    probing,
    mask: Mask,
    batch_size: Optional[int],
    seed,
    plan: Optional[sharding.Parallelism] = None,
) -> ZerothOrderTransform:
  """An estimator on ``num_queries`` random directions per step, probed by
  ``probing`` (finite differences, or JVPs for forward gradients)."""
  checks.validate_positive_int('num_queries', num_queries)
  num_queries = int(num_queries)
  checks.validate_choice('distribution', distribution,
                         directions_lib.DISTRIBUTIONS)

  def make_directions(step_key: jax.Array, space: Perturbable):
    return directions_lib.random_directions(step_key, space, num_queries,
                                            distribution)

  return directional.direction_transform(
      name, make_directions=make_directions,
      count_directions=lambda space: num_queries, probing=probing,
      sigma=sigma, mask=mask, batch_size=batch_size, seed=seed, plan=plan)
