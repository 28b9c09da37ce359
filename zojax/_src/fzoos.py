r"""FZooS's trajectory-informed surrogate gradient as an optax transform."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from zojax._src import checks
from zojax._src import parallel
from zojax._src import surrogate
from zojax._src.base import ZerothOrderTransform, key_from_seed
from zojax._src.perturbable import flatten_params
from zojax._src.stats import EstimateStats


class FZooSState(NamedTuple):
  """State of :func:`zojax.fzoos` (a plain pytree of arrays).

  Attributes:
    key: PRNG key, split every step.
    history: the newest queries (:class:`zojax.federated.QueryHistory`:
      flat float32 points, values, which slots are filled).
    stats: evaluation counters for :func:`zojax.estimate_info`.
  """

  key: jax.Array
  history: surrogate.QueryHistory
  stats: EstimateStats


def validate_surrogate_args(history_size, num_candidates, num_active, radius,
                            lengthscale, noise) -> None:
  """The checks shared by :func:`fzoos` and the federated FZooS."""
  checks.validate_positive_int('history_size', history_size)
  checks.validate_positive_int('num_candidates', num_candidates)
  checks.validate_positive_int('num_active', num_active)
  if num_active > num_candidates:
    raise ValueError(f'num_active ({num_active}) cannot exceed '
                     f'num_candidates ({num_candidates}).')
  for name, value in (('radius', radius), ('lengthscale', lengthscale),
                      ('noise', noise)):
    if not float(value) > 0:
      raise ValueError(f'{name} must be > 0, got {value!r}.')


def fzoos(
    history_size: int = 150,
    *,
    num_candidates: int = 100,
    num_active: int = 5,
    radius: float = 0.01,
    lengthscale: float = 1.0,
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
     :math:`\nabla f`);
  2. evaluates :math:`f` at :math:`x` and at those points
     (``1 + num_active`` evaluations, one vmapped batch) and adds them to
     the history;
  3. returns the gradient of the GP posterior mean at :math:`x`,

     .. math::
       \nabla\mu(x) = \partial k(x, X)^\top (K + s^2 I)^{-1} y,

     with the squared-exponential kernel
     :math:`k(x, x') = \exp(-\|x - x'\|^2/2\ell^2)` (:math:`\ell` =
     ``lengthscale``, :math:`s^2` = ``noise``) on min-max normalised values.

  No finite differences: the estimate reuses the whole optimization
  trajectory, which is what makes FZooS query-efficient. Chain it with a
  first-order optimizer (the paper uses Adam)::

    tx = optax.chain(zojax.fzoos(), optax.adam(0.01))

  Choices (stated because the reference code differs): a fixed SE
  lengthscale, where the reference code fits a Matérn-5/2 kernel by maximum
  likelihood at every step; the newest ``history_size`` queries, where it
  takes the 150 nearest of all queries (unbounded memory); and candidates
  scored by the trace of the gradient covariance, where it scores the first
  coordinate's variance. Cost per step :math:`O(H^3 + H^2 d + C H^2)` for
  :math:`H` = ``history_size``, :math:`C` = ``num_candidates``: bounded, not
  growing with the number of steps. Parameters are flattened into one
  float32 vector of :math:`d` entries, so this is for problems with
  :math:`d` up to a few thousand.

  Non-finite values are not stored; a step whose :math:`f(x)` is not finite
  returns a zero update and counts as skipped.

  Ask/tell (objective outside JAX)::

    key = jax.random.split(state.key)[1]
    points = est.ask(key, params, state)     # leading axis: 1 + num_active
    values = [f(p) for p in points]          # any evaluator
    grad, state = est.tell(state, params, points, values)

  Args:
    history_size: :math:`H`, queries kept (>= 1).
    num_candidates: candidates drawn per step.
    num_active: of them, queried per step (<= ``num_candidates``).
    radius: :math:`r`, half-width of the candidate box.
    lengthscale: :math:`\ell`, of the kernel (in the units of ``params``).
    noise: :math:`s^2`, the observation noise variance of the GP (on values
      normalised to [0, 1]).
    batch_size: points evaluated at once; ``None`` = all ``1 + num_active``.
    seed: int seed or PRNG key.

  Returns:
    A :class:`zojax.ZerothOrderTransform` whose ``update`` needs ``obj_fn``.

  References:
    Shu, Lin, Dai & Low, Federated Zeroth-Order Optimization using
    Trajectory-Informed Surrogate Gradients, 2024 (arXiv:2308.04077);
    Shu, Dai, Sng, Verma, Jaillet & Low, Zeroth-Order Optimization with
    Trajectory-Informed Derivative Estimation, ICLR 2023.
  """
  validate_surrogate_args(history_size, num_candidates, num_active, radius,
                          lengthscale, noise)
  checks.validate_positive_int('batch_size', batch_size, allow_none=True)
  initial_key = key_from_seed(seed)
  gp = dict(lengthscale=lengthscale, noise=noise)

  def init_fn(params):
    flat, _ = flatten_params(params)
    return FZooSState(
        key=initial_key,
        history=surrogate.QueryHistory.empty(history_size, flat.shape[0]),
        stats=EstimateStats.create(1 + num_active))

  def flat_of(params, state):
    flat, unflatten = flatten_params(params)
    if flat.shape[0] != state.history.points.shape[1]:
      raise ValueError(
          f'fzoos: params have {flat.shape[0]} entries but the state was '
          f'initialised for {state.history.points.shape[1]}.')
    return flat, unflatten

  def ask_flat(key, x, history):
    return surrogate.points_to_query(
        key, history, x, num_candidates=num_candidates,
        num_chosen=num_active, radius=radius, **gp)

  def ask_fn(key, params, state):
    x, unflatten = flat_of(params, state)
    return jax.vmap(unflatten)(ask_flat(key, x, state.history))

  def tell_flat(state, x, points, values):
    values = jnp.asarray(values, jnp.float32)
    history = state.history.add(points, values)
    gradient = surrogate.posterior_mean_gradient(history, x, **gp)
    usable = jnp.isfinite(values[0]) & jnp.all(jnp.isfinite(gradient))
    gradient = jnp.where(usable, gradient, 0.0)
    stats = state.stats.record(values[0], usable)
    key = jax.random.split(state.key)[0]
    return gradient, state._replace(key=key, history=history, stats=stats)

  def tell_fn(state, params, points, values):
    x, unflatten = flat_of(params, state)
    flat_points = jax.vmap(lambda p: flat_of(p, state)[0])(points)
    gradient, state = tell_flat(state, x, flat_points, values)
    return unflatten(gradient), state

  def update_fn(updates, state, params=None, *, obj_fn=None, batch=None,
                **extra_args):
    del updates, extra_args
    checks.check_update_args('fzoos', params, obj_fn, batch, None)
    objective = parallel.bind_objective(obj_fn, batch, None)
    x, unflatten = flat_of(params, state)
    ask_key = jax.random.split(state.key)[1]
    points = ask_flat(ask_key, x, state.history)
    values = parallel.evaluate_points(
        lambda p: objective(unflatten(p)), points,
        batch_size=batch_size)
    gradient, state = tell_flat(state, x, points, values)
    return unflatten(gradient), state

  return ZerothOrderTransform(init_fn, update_fn, ask=ask_fn, tell=tell_fn)

