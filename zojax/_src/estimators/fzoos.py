r"""FZooS's trajectory-informed surrogate gradient as an optax transform."""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from zojax._src.core import checks
from zojax._src.core import keys
from zojax._src.core.base import ZerothOrderTransform
from zojax._src.core.perturbable import flatten_params
from zojax._src.core.stats import EstimateStats
from zojax._src.estimators import kernels
from zojax._src.estimators import surrogate
from zojax._src.estimators.directional import check_values
from zojax._src.query import engine
from zojax._src.query import sharding


class FZooSState(NamedTuple):
  """State of :func:`zojax.fzoos` (a plain pytree of arrays).

  Attributes:
    key: PRNG key, split every step.
    history: the newest queries (:class:`zojax.federated.QueryHistory`:
      flat float32 points, values, which slots are filled).
    lengthscale: the GP's lengthscale at the last step (fixed, or the last
      maximum-likelihood fit: the next step's first start and what scores
      its active queries).
    stats: evaluation counters for :func:`zojax.estimate_info`.
  """

  key: jax.Array
  history: surrogate.QueryHistory
  lengthscale: jax.Array
  stats: EstimateStats


def local_gp(history_size, num_nearest, kernel, lengthscale,
             noise) -> surrogate.LocalGP:
  """The checked settings of the local GP, shared by :func:`fzoos` and the
  federated FZooS."""
  checks.validate_positive_int('history_size', history_size)
  checks.validate_positive_int('num_nearest', num_nearest, allow_none=True)
  checks.validate_choice('kernel', kernel, kernels.KERNELS)
  if isinstance(lengthscale, str):
    if lengthscale != 'ml':
      raise ValueError(f"lengthscale must be a number > 0 or 'ml', got "
                       f'{lengthscale!r}.')
  else:
    checks.validate_positive_float('lengthscale', lengthscale,
                                   allow_schedule=False)
    lengthscale = float(lengthscale)
  checks.validate_positive_float('noise', noise, allow_schedule=False)
  return surrogate.LocalGP(kernel=kernel, lengthscale=lengthscale,
                           noise=float(noise),
                           num_nearest=checks.as_int(num_nearest))


def validate_active_args(num_candidates, num_active, radius) -> None:
  """The checks of the active queries, shared with the federated FZooS."""
  checks.validate_positive_int('num_candidates', num_candidates)
  checks.validate_positive_int('num_active', num_active)
  if num_active > num_candidates:
    raise ValueError(f'num_active ({num_active}) cannot exceed '
                     f'num_candidates ({num_candidates}).')
  checks.validate_positive_float('radius', radius, allow_schedule=False)


def fzoos(
    history_size: int = 1000,
    *,
    num_nearest: Optional[int] = 150,
    kernel: str = 'matern52',
    lengthscale: Union[float, str] = 'ml',
    num_candidates: int = 100,
    num_active: int = 5,
    radius: float = 0.01,
    noise: float = 1e-6,
    batch_size: Optional[int] = None,
    seed=0,
) -> ZerothOrderTransform:
  r"""Trajectory-informed surrogate gradient (FZooS, one client).

  The state keeps the newest ``history_size`` queries :math:`(x_j, y_j)` of
  the objective (a fixed-size ring buffer, so every step has the same shapes
  and compiles once). A step at :math:`x`:

  1. *active queries*: draws ``num_candidates`` points :math:`x + \delta`,
     :math:`\delta \sim U[-r, r]^d` (:math:`r` = ``radius``), and keeps the
     ``num_active`` whose gradient is most uncertain under the GP fitted to
     the history and :math:`x` (the trace of the posterior covariance of
     :math:`\nabla f`, with the last step's lengthscale);
  2. evaluates :math:`f` at :math:`x` and at those points
     (``1 + num_active`` evaluations, one vmapped batch) and adds them to
     the history;
  3. fits the GP to the ``num_nearest`` stored queries nearest to :math:`x`
     and returns the gradient of its posterior mean at :math:`x`,

     .. math::
       \nabla\mu(x) = \partial k(x, X)^\top (K + s^2 I)^{-1} y,

     with the Matérn-5/2 kernel :math:`k(r) = (1 + \sqrt5 r/\ell +
     5r^2/3\ell^2)\,e^{-\sqrt5 r/\ell}` (``kernel='matern52'``) or the
     squared exponential :math:`\exp(-r^2/2\ell^2)` (``'se'``), on min-max
     normalised values; :math:`\ell` fixed (a float) or (``'ml'``) the
     maximum-likelihood lengthscale of those queries, refitted every step
     (4 restarts of 20 Adam steps on :math:`\log\ell`, the first from the
     last step's value).

  No finite differences: the estimate reuses the whole optimization
  trajectory, which is what makes FZooS query-efficient. Chain it with a
  first-order optimizer (the paper uses Adam)::

    tx = optax.chain(zojax.fzoos(), optax.adam(0.01))

  The defaults are the reference code's choices (Matérn-5/2, maximum
  likelihood, the 150 nearest queries), with two stated differences: the
  nearest are taken among the newest ``history_size`` (a bounded state:
  :math:`4 H d` bytes for :math:`H` = ``history_size``; the reference keeps
  every query), and candidates are scored by the trace of the gradient
  covariance (the reference: the first coordinate's variance under an SE
  kernel). ``zojax.fzoos(150, num_nearest=None, kernel='se',
  lengthscale=1.0)`` is the former surrogate (the newest 150 queries, SE,
  :math:`\ell = 1`). Cost per step :math:`O(Hd + n^3 + n^2 d + C n^2)` for
  :math:`n` = ``min(num_nearest, history_size)`` fitted points and
  :math:`C` = ``num_candidates``, plus :math:`4 \times 20` Cholesky
  factorisations of :math:`n \times n` with ``'ml'``: bounded, not growing
  with the number of steps. Parameters are flattened into one float32
  vector of :math:`d` entries, so this is for problems with :math:`d` up to
  a few thousand.

  Non-finite values are not stored; a step whose :math:`f(x)` is not finite
  returns a NaN estimate (``optax.apply_if_finite`` downstream skips it) and
  counts as skipped.

  Ask/tell (objective outside JAX)::

    points = est.ask(state, params)          # leading axis: 1 + num_active
    values = [f(p) for p in unstack(points)]  # any evaluator
    grad, state = est.tell(state, params, points, values)

  Args:
    history_size: :math:`H`, queries kept (>= 1).
    num_nearest: queries the GP is fitted to (the nearest to the point), or
      ``None``: all stored (also when ``history_size`` is smaller).
    kernel: ``'matern52'`` or ``'se'``.
    lengthscale: :math:`\ell` of the kernel (in the units of ``params``),
      or ``'ml'``: maximum likelihood at every step.
    num_candidates: candidates drawn per step.
    num_active: of them, queried per step (<= ``num_candidates``).
    radius: :math:`r`, half-width of the candidate box.
    noise: :math:`s^2`, the observation noise variance of the GP (on values
      normalised to [0, 1]).
    batch_size: points evaluated at once; ``None`` = all ``1 + num_active``.
    seed: an integer or a PRNG key.

  Returns:
    A :class:`zojax.ZerothOrderTransform` whose ``update`` needs ``obj_fn``.

  References:
    Shu, Lin, Dai & Low, Federated Zeroth-Order Optimization using
    Trajectory-Informed Surrogate Gradients, 2024 (arXiv:2308.04077);
    Shu, Dai, Sng, Verma, Jaillet & Low, Zeroth-Order Optimization with
    Trajectory-Informed Derivative Estimation, ICLR 2023.
  """
  gp = local_gp(history_size, num_nearest, kernel, lengthscale, noise)
  validate_active_args(num_candidates, num_active, radius)
  checks.validate_positive_int('batch_size', batch_size, allow_none=True)
  keys.check_seed(seed)
  history_size, num_candidates, num_active = (
      int(history_size), int(num_candidates), int(num_active))
  batch_size = checks.as_int(batch_size)
  evals = 1 + num_active

  def init(params):
    flat, _ = flatten_params(params)
    return FZooSState(
        key=keys.key_data(seed),
        history=surrogate.QueryHistory.empty(history_size, flat.shape[0]),
        lengthscale=jnp.asarray(gp.initial_lengthscale, jnp.float32),
        stats=EstimateStats.create(evals))

  def flat_of(params, state):
    checks.check_state('fzoos', state, FZooSState, evals)
    flat, unflatten = flatten_params(params)
    if flat.shape[0] != state.history.points.shape[1]:
      raise ValueError(
          f'fzoos: params have {flat.shape[0]} entries but the state was '
          f'initialised for {state.history.points.shape[1]}.')
    return flat, unflatten

  def ask_flat(state, x):
    return gp.points_to_query(
        keys.step_key(state.key), state.history, x, state.lengthscale,
        num_candidates=num_candidates, num_chosen=num_active, radius=radius)

  def ask(state, params):
    x, unflatten = flat_of(params, state)
    return jax.vmap(unflatten)(ask_flat(state, x))

  def tell_flat(state, x, points, values):
    history = state.history.add(points, values)
    key, step_key = keys.advance(state.key)
    gradient, lengthscale = gp.gradient(keys.fold_in(step_key, 1), history,
                                        x, state.lengthscale)
    usable = jnp.isfinite(values[0]) & jnp.all(jnp.isfinite(gradient))
    stats = state.stats.record(values[0], usable)
    return (engine.nan_unless(usable, gradient),
            state._replace(key=key, history=history, lengthscale=lengthscale,
                           stats=stats))

  def tell(state, params, points, values):
    x, unflatten = flat_of(params, state)
    values = check_values('fzoos', points, values, evals)
    flat_points = jax.vmap(lambda p: flatten_params(p)[0])(points)
    gradient, state = tell_flat(state, x, flat_points, values)
    return unflatten(gradient), state

  def update(updates, state, params=None, *positional, obj_fn=None,
             batch=None, **extra_args):
    del updates, extra_args
    checks.require_update_args('fzoos', params, obj_fn, positional)
    sharding.check_objective(obj_fn, params, batch, None)
    objective = sharding.bind_objective(obj_fn, batch, None)
    x, unflatten = flat_of(params, state)
    points = ask_flat(state, x)
    values = engine.evaluate_points(lambda p: objective(unflatten(p)),
                                    points, batch_size=batch_size)
    gradient, state = tell_flat(state, x, points, values)
    return unflatten(gradient), state

  return ZerothOrderTransform(init, update, ask, tell)
