r"""The ZO-Bench optimizer family as optax chains.

All of them are built on the two-point (central) randomized estimate of
ZO-Bench's trainer, with :math:`q` = ``num_queries`` (1 by default) and
:math:`\epsilon` = ``sigma`` (1e-3):

.. math::
  g_i = \frac{L(\theta + \epsilon z_i) - L(\theta - \epsilon z_i)}{2\epsilon},
  \qquad \hat g = \frac{1}{q}\sum_i g_i z_i, \qquad z_i \sim N(0, I).

Each alias returns an ``optax.GradientTransformationExtraArgs`` used exactly
like an estimator: ``tx.update(None, state, params, obj_fn=obj_fn)``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from zojax._src import checks
from zojax._src import parallel
from zojax._src.conservative import conservative_selection
from zojax._src.forward_gradient import forward_gradient
from zojax._src.perturbable import Mask
from zojax._src.rge import random_direction_transform


def _two_point(name, sigma, num_queries, distribution, mask, batch_size, seed,
               mesh, query_axis, data_axis, coefficient_map=None):
  return random_direction_transform(
      name, num_queries, sigma, distribution=distribution,
      difference='central', mask=mask, batch_size=batch_size, seed=seed,
      coefficient_map=coefficient_map,
      plan=parallel.parallelism(mesh, query_axis, data_axis))


def zo_sgd(
    learning_rate: optax.ScalarOrSchedule,
    sigma: float = 1e-3,
    num_queries: int = 1,
    *,
    distribution: str = 'gaussian',
    mask: Mask = None,
    batch_size: Optional[int] = None,
    seed=0,
    mesh: Optional[jax.sharding.Mesh] = None,
    query_axis: Optional[str] = None,
    data_axis: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""ZO-SGD: :math:`\theta \leftarrow \theta - \eta\hat g`.

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    sigma: perturbation size :math:`\epsilon`.
    num_queries: directions :math:`q` per step (``2q`` evaluations).
    distribution, mask, batch_size, seed, mesh, query_axis, data_axis: as in
      :func:`zojax.rge`.

  References:
    Ghadimi & Lan, 2013; Malladi et al., MeZO, 2023; Zhang et al., ZO-Bench,
    2024.
  """
  return optax.chain(
      _two_point('zo_sgd', sigma, num_queries, distribution, mask, batch_size,
                 seed, mesh, query_axis, data_axis),
      optax.sgd(learning_rate))


def zo_sgd_momentum(
    learning_rate: optax.ScalarOrSchedule,
    sigma: float = 1e-3,
    num_queries: int = 1,
    *,
    momentum: float = 0.9,
    distribution: str = 'gaussian',
    mask: Mask = None,
    batch_size: Optional[int] = None,
    seed=0,
    mesh: Optional[jax.sharding.Mesh] = None,
    query_axis: Optional[str] = None,
    data_axis: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""ZO-SGD with heavy-ball momentum (PyTorch's rule, ``optax.sgd``):
  :math:`m \leftarrow \mu m + \hat g`, :math:`\theta \leftarrow \theta - \eta m`.

  Args:
    learning_rate: :math:`\eta`.
    sigma, num_queries: as in :func:`zo_sgd`.
    momentum: :math:`\mu` (0.9, as in ZO-Bench).
    distribution, mask, batch_size, seed, mesh, query_axis, data_axis: as in
      :func:`zojax.rge`.
  """
  return optax.chain(
      _two_point('zo_sgd_momentum', sigma, num_queries, distribution, mask,
                 batch_size, seed, mesh, query_axis, data_axis),
      optax.sgd(learning_rate, momentum=momentum))


def zo_sign_sgd(
    learning_rate: optax.ScalarOrSchedule,
    sigma: float = 1e-3,
    num_queries: int = 1,
    *,
    distribution: str = 'gaussian',
    mask: Mask = None,
    batch_size: Optional[int] = None,
    seed=0,
    mesh: Optional[jax.sharding.Mesh] = None,
    query_axis: Optional[str] = None,
    data_axis: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""ZO-SGD-Sign with ZO-Bench's rule: the sign of each *scalar* difference.

  .. math::
    \theta \leftarrow \theta - \frac{\eta}{q}\sum_i \operatorname{sign}(g_i)
    z_i

  (not the elementwise sign of :math:`\hat g`, as in ZO-signSGD of Liu et al.;
  this is what ZO-Bench's trainer does).

  Args: as in :func:`zo_sgd`.
  """
  return optax.chain(
      _two_point('zo_sign_sgd', sigma, num_queries, distribution, mask,
                 batch_size, seed, mesh, query_axis, data_axis,
                 coefficient_map=jnp.sign),
      optax.sgd(learning_rate))


def zo_sgd_conservative(
    learning_rate: optax.ScalarOrSchedule,
    sigma: float = 1e-3,
    num_queries: int = 1,
    *,
    distribution: str = 'gaussian',
    mask: Mask = None,
    batch_size: Optional[int] = None,
    seed=0,
    mesh: Optional[jax.sharding.Mesh] = None,
    query_axis: Optional[str] = None,
    data_axis: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""ZO-SGD-Cons: ZO-SGD that keeps the best of :math:`\theta`,
  :math:`\theta - \eta\hat g` and :math:`\theta + \eta\hat g`.

  See :func:`zojax.conservative_selection` for the rule. A step costs
  ``2q + 3`` evaluations: ``2q`` for the estimate, 3 for the selection
  (:math:`f(\theta)` and the two candidates), all counted by
  ``zojax.estimate_info``.

  Args: as in :func:`zo_sgd`.
  """
  return optax.chain(
      _two_point('zo_sgd_conservative', sigma, num_queries, distribution, mask,
                 batch_size, seed, mesh, query_axis, data_axis),
      optax.sgd(learning_rate),
      conservative_selection(mesh=mesh, data_axis=data_axis))


def zo_adam(
    learning_rate: optax.ScalarOrSchedule,
    sigma: float = 1e-3,
    num_queries: int = 1,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    distribution: str = 'gaussian',
    mask: Mask = None,
    batch_size: Optional[int] = None,
    seed=0,
    mesh: Optional[jax.sharding.Mesh] = None,
    query_axis: Optional[str] = None,
    data_axis: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""ZO-Adam: Adam (``optax.adam``) on the two-point estimate :math:`\hat g`.

  Args:
    learning_rate, sigma, num_queries: as in :func:`zo_sgd`.
    b1, b2, eps: Adam's hyperparameters (PyTorch/optax defaults).
    distribution, mask, batch_size, seed, mesh, query_axis, data_axis: as in
      :func:`zojax.rge`.

  References:
    Chen et al., ZO-AdaMM, NeurIPS 2019; Zhang et al., ZO-Bench, 2024.
  """
  return optax.chain(
      _two_point('zo_adam', sigma, num_queries, distribution, mask, batch_size,
                 seed, mesh, query_axis, data_axis),
      optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))


def forward_grad(
    learning_rate: optax.ScalarOrSchedule,
    sigma: float = 1e-3,
    num_queries: int = 1,
    *,
    distribution: str = 'gaussian',
    mask: Mask = None,
    batch_size: Optional[int] = None,
    seed=0,
    mesh: Optional[jax.sharding.Mesh] = None,
    query_axis: Optional[str] = None,
    data_axis: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Forward-gradient SGD: :math:`\theta \leftarrow \theta - \eta
  (\nabla L^\top v) v` with :math:`v \sim N(0, I)` and the directional
  derivative from ``jax.jvp`` (see :func:`zojax.forward_gradient`).

  Args:
    learning_rate: :math:`\eta`.
    sigma: accepted (and checked) so that every ZO-Bench optimizer shares one
      signature; unused, since the JVP has no finite-difference step.
    num_queries: JVP directions per step.
    distribution, mask, batch_size, seed, mesh, query_axis, data_axis: as in
      :func:`zojax.forward_gradient`.
  """
  checks.validate_sigma(sigma)
  return optax.chain(
      forward_gradient(num_queries, distribution=distribution, mask=mask,
                       batch_size=batch_size, seed=seed, mesh=mesh,
                       query_axis=query_axis),
      optax.sgd(learning_rate))
