r"""The optimizers: an estimator followed by optax transforms, as one
:class:`zojax.ZerothOrderTransform`.

All of them are built on the two-point (central) randomized estimate of
ZO-Bench's trainer, with :math:`q` = ``num_queries`` (1 by default) and
:math:`\epsilon` = ``sigma`` (1e-3):

.. math::
  g_i = \frac{L(\theta + \epsilon z_i) - L(\theta - \epsilon z_i)}{2\epsilon},
  \qquad \hat g = \frac{1}{q}\sum_i g_i z_i, \qquad z_i \sim N(0, I).

Each alias returns a :class:`zojax.ZerothOrderTransform` used exactly like
an estimator: ``tx.update(None, state, params, obj_fn=obj_fn)``, and
``ask``/``tell`` (the estimator's points; ``tell`` returns the optimizer's
update). The optax part after the estimator runs under
``optax.apply_if_finite``: a step whose estimate is not finite returns a zero
update and leaves the optimizer's state (momentum, Adam moments, schedule
count) untouched, and the estimator counts it in
``estimate_info(state).skipped_steps``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from zojax._src.core import checks
from zojax._src.core.base import ZerothOrderTransform, unsupported_ask_tell
from zojax._src.core.perturbable import Mask
from zojax._src.estimators import directional
from zojax._src.estimators.forward_gradient import forward_gradient
from zojax._src.estimators.rank import rank_estimator
from zojax._src.estimators.rge import random_direction_transform
from zojax._src.query import sharding
from zojax._src.selection import conservative_selection, rank_line_search

# apply_if_finite applies a non-finite update after this many in a row; a
# ZO step is skipped (and counted) however many non-finite values come.
_NEVER = 2**31 - 1


def zo_chain(estimator: ZerothOrderTransform,
             *transforms: optax.GradientTransformation,
             two_rounds: Optional[str] = None) -> ZerothOrderTransform:
  """``estimator`` then ``transforms`` (under ``optax.apply_if_finite``).

  ``ask`` is the estimator's; ``tell`` feeds its estimate to the
  transforms. ``two_rounds``: the name of a transform that evaluates the
  objective again (a selection), for the error that says why this chain has
  no single-round ask/tell.
  """
  rest = optax.apply_if_finite(optax.chain(*transforms), _NEVER)
  chain = optax.chain(estimator, rest)
  if two_rounds is not None:
    ask, tell = unsupported_ask_tell(
        two_rounds, 'a step evaluates the objective a second time after the '
        'estimate, so it needs two rounds of points. Use update() with the '
        "objective, or the estimator's ask/tell followed by your own "
        'selection.')
    return ZerothOrderTransform(chain.init, chain.update, ask, tell)

  def ask(state, params):
    return estimator.ask(state[0], params)

  def tell(state, params, points, values):
    estimate, estimator_state = estimator.tell(state[0], params, points,
                                               values)
    updates, rest_state = rest.update(estimate, state[1], params)
    return updates, (estimator_state, rest_state)

  return ZerothOrderTransform(chain.init, chain.update, ask, tell)


def _two_point(name, sigma, num_queries, distribution, mask, batch_size, seed,
               mesh, query_axis, data_axis, coefficient_map=None):
  return random_direction_transform(
      name, num_queries, sigma, distribution=distribution,
      probing=directional.FiniteDifferences('central', coefficient_map),
      mask=mask, batch_size=batch_size, seed=seed,
      plan=sharding.parallelism(mesh, query_axis, data_axis))


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
) -> ZerothOrderTransform:
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
  return zo_chain(
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
) -> ZerothOrderTransform:
  r"""ZO-SGD with heavy-ball momentum (PyTorch's rule, ``optax.sgd``):
  :math:`m \leftarrow \mu m + \hat g`, :math:`\theta \leftarrow \theta - \eta m`.

  Args:
    learning_rate: :math:`\eta`.
    sigma, num_queries: as in :func:`zo_sgd`.
    momentum: :math:`\mu` (0.9, as in ZO-Bench).
    distribution, mask, batch_size, seed, mesh, query_axis, data_axis: as in
      :func:`zojax.rge`.
  """
  return zo_chain(
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
) -> ZerothOrderTransform:
  r"""ZO-SGD-Sign with ZO-Bench's rule: the sign of each *scalar* difference.

  .. math::
    \theta \leftarrow \theta - \frac{\eta}{q}\sum_i \operatorname{sign}(g_i)
    z_i

  (not the elementwise sign of :math:`\hat g`, as in ZO-signSGD of Liu et al.;
  this is what ZO-Bench's trainer does).

  Args: as in :func:`zo_sgd`.
  """
  return zo_chain(
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
) -> ZerothOrderTransform:
  r"""ZO-SGD-Cons: ZO-SGD that keeps the best of :math:`\theta`,
  :math:`\theta - \eta\hat g` and :math:`\theta + \eta\hat g`.

  See :func:`zojax.conservative_selection` for the rule. A step costs
  ``2q + 3`` evaluations: ``2q`` for the estimate, 3 for the selection
  (:math:`f(\theta)` and the two candidates), all counted by
  ``zojax.estimate_info``.

  Args: as in :func:`zo_sgd`.
  """
  return zo_chain(
      _two_point('zo_sgd_conservative', sigma, num_queries, distribution, mask,
                 batch_size, seed, mesh, query_axis, data_axis),
      optax.sgd(learning_rate),
      conservative_selection(mesh=mesh, data_axis=data_axis),
      two_rounds='zo_sgd_conservative')


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
) -> ZerothOrderTransform:
  r"""ZO-Adam: Adam (``optax.adam``) on the two-point estimate :math:`\hat g`.

  Args:
    learning_rate, sigma, num_queries: as in :func:`zo_sgd`.
    b1, b2, eps: Adam's hyperparameters (PyTorch/optax defaults).
    distribution, mask, batch_size, seed, mesh, query_axis, data_axis: as in
      :func:`zojax.rge`.

  References:
    Chen et al., ZO-AdaMM, NeurIPS 2019; Zhang et al., ZO-Bench, 2024.
  """
  return zo_chain(
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
) -> ZerothOrderTransform:
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
  return zo_chain(
      forward_gradient(num_queries, distribution=distribution, mask=mask,
                       batch_size=batch_size, seed=seed, mesh=mesh,
                       query_axis=query_axis, data_axis=data_axis),
      optax.sgd(learning_rate))


def zo_ranksgd(
    learning_rate: optax.ScalarOrSchedule,
    num_points: int = 10,
    top_k: int = 5,
    sigma=0.1,
    *,
    line_search_steps: int = 0,
    mask: Mask = None,
    batch_size: int | None = None,
    seed=0,
) -> ZerothOrderTransform:
  r"""ZO-RankSGD: :math:`x \leftarrow x - \eta\,\hat g` with the rank estimate.

  :func:`zojax.rank_estimator` followed by ``optax.sgd(learning_rate)``,
  and with ``line_search_steps=L > 0`` by :func:`zojax.rank_line_search`
  (the oracle then also ranks :math:`x - 2^{-j}\eta\hat g`, :math:`j < L`,
  and :math:`x`; the best is taken: a second round of ranking, so no
  single-round ask/tell). ``update`` needs ``rank_fn``. Per step the oracle
  ranks ``num_points`` (plus ``L + 1``) points, all counted by
  ``estimate_info``.

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    num_points, top_k, sigma: as in :func:`zojax.rank_estimator` (defaults:
      the paper's synthetic setting m = 10, mu = 0.1, with k = 5).
    line_search_steps: :math:`L`, 0 for none.
    mask, batch_size, seed: as in :func:`zojax.rank_estimator`.

  References:
    Tang, Rybin & Chang, ICLR 2024.
  """
  checks.validate_positive_int('line_search_steps', line_search_steps,
                               minimum=0)
  estimator = rank_estimator(num_points, top_k, sigma, mask=mask,
                             batch_size=batch_size, seed=seed)
  if not line_search_steps:
    return zo_chain(estimator, optax.sgd(learning_rate))
  return zo_chain(estimator, optax.sgd(learning_rate),
                  rank_line_search(line_search_steps),
                  two_rounds='zo_ranksgd(line_search_steps > 0)')
