r"""CBO: consensus-based optimization with particles in the optimizer state."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from zojax._src import checks
from zojax._src import parallel
from zojax._src.base import key_from_seed
from zojax._src.perturbable import check_params
from zojax._src.stats import EstimateStats

NOISE_KINDS = ('isotropic', 'anisotropic')
_ESS_BISECTION_STEPS = 40


class CBOState(NamedTuple):
  """State of :func:`zojax.cbo` (a plain pytree of arrays).

  Attributes:
    key: PRNG key, split every step.
    particles: the particles, a pytree like ``params`` (float32 leaves) with a
      leading axis of ``num_particles``.
    alpha: the current inverse temperature :math:`\alpha` (annealed).
    consensus: the last consensus point (params-shaped, float32).
    resamplings: how many times the particles were resampled.
    stats: evaluation counters for :func:`zojax.estimate_info`.
  """

  key: jax.Array
  particles: Any
  alpha: jax.Array
  consensus: Any
  resamplings: jax.Array
  stats: EstimateStats


def cbo(
    num_particles: int,
    *,
    alpha: float = 10.0,
    drift: float = 1.0,
    noise: float = 1.0,
    dt: float = 0.1,
    noise_kind: str = 'isotropic',
    init_std: float = 1.0,
    particle_batch: Optional[int] = None,
    update_all_particles: bool = False,
    alpha_growth: float = 1.0,
    alpha_max: float = 1e5,
    target_ess: Optional[float] = None,
    resample_tol: Optional[float] = None,
    resample_std: float = 0.1,
    batch_size: Optional[int] = None,
    seed=0,
    mesh: Optional[jax.sharding.Mesh] = None,
    particle_axis: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Consensus-based optimization (CBO) as an optax transform.

  :math:`N` = ``num_particles`` particles :math:`X^i` live in the state,
  started at ``params`` + ``init_std`` :math:`\cdot N(0, I)`. Each step
  evaluates :math:`f` at the particles, forms the consensus point (a Gibbs
  average, computed with a log-sum-exp)

  .. math::
    v_\alpha = \sum_i w_i X^i, \qquad
    w_i = \frac{e^{-\alpha f(X^i)}}{\sum_j e^{-\alpha f(X^j)}},

  and moves every particle with the Euler-Maruyama step

  .. math::
    X^i \leftarrow X^i - \lambda\,dt\,(X^i - v_\alpha)
      + \sigma \sqrt{dt}\; \|X^i - v_\alpha\|_2\, \xi^i \quad
      \text{(isotropic)}, \qquad
      \ldots + \sigma \sqrt{dt}\; (X^i - v_\alpha) \odot \xi^i \quad
      \text{(anisotropic)},

  :math:`\xi^i \sim N(0, I)`, :math:`\lambda` = ``drift``, :math:`\sigma` =
  ``noise``. The norm runs over all leaves of a particle. CBO is a
  stochastic relaxation of gradient descent (Riedl et al., 2023): for large
  :math:`\alpha` the consensus concentrates on the best particles.

  **What ``update`` returns**: ``consensus - params``, so
  ``optax.apply_updates`` puts ``params`` on the new consensus point. It is
  an *update*, not a gradient estimate: use ``cbo`` alone, or chain it with
  transforms that act on updates (``optax.scale(0.5)`` moves halfway,
  ``optax.clip_by_global_norm`` bounds the jump); do not follow it with
  ``optax.sgd``/``adam``, which would negate it. The particles do not follow
  ``params``: they move by the dynamics above only.

  **Variants** (CBXpy's options):

  * ``particle_batch=M``: random mini-batch interaction. Each step takes the
    next ``M`` particles of a random permutation (a new one every ``N/M``
    steps, so each particle is used once per epoch), computes the consensus
    from them and moves only them (or all particles with
    ``update_all_particles=True``). ``M`` must divide ``N``.
  * ``alpha_growth``: :math:`\alpha \leftarrow \min(\gamma\alpha,
    \alpha_{max})` after every step (CBXpy's default scheduler uses
    :math:`\gamma` = 1.05, :math:`\alpha_{max}` = 1e5).
  * ``target_ess=eta``: instead, choose :math:`\alpha \le \alpha_{max}` each
    step so that the effective sample size
    :math:`(\sum_i w_i)^2 / \sum_i w_i^2` is :math:`\eta` times the number
    of evaluated particles (bisection in :math:`\log\alpha`, Carrillo et al.).
  * ``resample_tol``: if the consensus moved by less than this (2-norm) in a
    step, every particle gets an extra :math:`0.1\sqrt{dt}\,\xi` kick
    (``resample_std``; CBXpy's resampling on stagnation).

  **Noisy objectives**: the particles' values are recomputed every step from
  the ``obj_fn`` passed to that step, so a closure over a fresh data batch per
  step (or ``batch=`` with ``obj_fn(params, batch)``) gives CBO on a
  stochastic objective.

  **Cost**: ``N`` (or ``M``) evaluations per step, plus one at ``params``
  (reported as ``estimate_info(state).value``), evaluated in ``vmap`` chunks
  of ``batch_size``, split over ``mesh`` axis ``particle_axis`` when given.
  Non-finite values get zero weight; if no value is finite the step leaves
  the particles and ``params`` unchanged and counts as skipped.

  Args:
    num_particles: :math:`N` (>= 2).
    alpha: initial :math:`\alpha` (> 0).
    drift: :math:`\lambda` (>= 0).
    noise: :math:`\sigma` (>= 0).
    dt: time step (> 0).
    noise_kind: ``'isotropic'`` or ``'anisotropic'``.
    init_std: standard deviation of the initial cloud around ``params``.
    particle_batch: mini-batch size ``M`` of the interaction, or ``None``.
    update_all_particles: with ``particle_batch``, move all particles
      towards the mini-batch consensus (CBXpy's ``partial=False``).
    alpha_growth: factor applied to :math:`\alpha` after each step (>= 1).
    alpha_max: cap of :math:`\alpha` for both schedules.
    target_ess: effective-sample-size fraction in (0, 1], or ``None``.
    resample_tol: stagnation threshold for resampling, or ``None``.
    resample_std: size of the resampling kick (times :math:`\sqrt{dt}`).
    batch_size: particles evaluated at once; ``None`` = all.
    seed: int seed or PRNG key.
    mesh, particle_axis: evaluate the particles split over this mesh axis
      (see :mod:`zojax.parallel`; the evaluated count must be a multiple of
      its size).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
    ``obj_fn`` (scoring one parameter pytree).

  References:
    Pinnau, Totzeck, Tse & Martin, A consensus-based model for global
    optimization, M3AS 2017; Carrillo, Jin, Li & Zhu, A consensus-based
    global optimization method for high dimensional machine learning
    problems, ESAIM:COCV 2021; Riedl, Klock, Geldhauser & Fornasier,
    Gradient is All You Need?, 2023; Bailo et al., CBX: Python and Julia
    packages for consensus-based interacting particle methods, JOSS 2024.
  """
  _validate(num_particles, alpha, drift, noise, dt, noise_kind, init_std,
            particle_batch, alpha_growth, alpha_max, target_ess, resample_tol,
            resample_std)
  checks.validate_positive_int('batch_size', batch_size, allow_none=True)
  plan = parallel.parallelism(mesh, query_axis=particle_axis)
  evaluated = particle_batch or num_particles
  if plan is not None and evaluated % plan.query_devices:
    raise ValueError(
        f'{evaluated} particles per step do not split evenly over the '
        f'{plan.query_devices} devices of mesh axis {plan.query_axis!r}.')
  initial_key = key_from_seed(seed)
  epoch_key = jax.random.fold_in(initial_key, 1)  # mini-batch permutations

  def init_fn(params):
    check_params(params)
    key, init_key = jax.random.split(initial_key)
    start = _as_float32(params)
    particles = jax.tree.map(
        lambda x, z: x[None] + init_std * z, start,
        _normal_like(init_key, start, num_particles))
    return CBOState(
        key=key, particles=particles,
        alpha=jnp.asarray(alpha, jnp.float32), consensus=start,
        resamplings=jnp.zeros((), jnp.int32),
        stats=EstimateStats.create(evaluated + 1))

  def update_fn(updates, state, params=None, *, obj_fn=None, batch=None,
                **extra_args):
    del updates, extra_args
    checks.check_update_args('cbo', params, obj_fn, batch, None)
    objective = parallel.bind_objective(obj_fn, batch, None)
    key, noise_key, kick_key = jax.random.split(state.key, 3)
    index = _interaction_indices(epoch_key, state.stats.steps, num_particles,
                                 particle_batch)
    chosen = _take(state.particles, index)
    energies = parallel.evaluate_points(
        objective, chosen, batch_size=batch_size, mesh=mesh,
        axis=plan.query_axis if plan else None)
    finite = jnp.isfinite(energies)
    any_finite = jnp.any(finite)
    energies = jnp.where(finite, energies, jnp.inf)
    step_alpha = state.alpha
    if target_ess is not None:
      step_alpha = _alpha_for_ess(energies, target_ess, alpha_max)
    consensus = _consensus(chosen, energies, step_alpha)

    moved = state.particles if update_all_particles else chosen
    moved = _euler_maruyama(moved, consensus, noise_key, drift=drift,
                            noise=noise, dt=dt, noise_kind=noise_kind)
    resample = jnp.zeros((), bool)
    if resample_tol is not None:
      shift = jnp.sqrt(sum(jnp.sum(jnp.square(a - b)) for a, b in zip(
          jax.tree.leaves(consensus), jax.tree.leaves(state.consensus))))
      resample = (state.stats.steps > 0) & (shift < resample_tol)
      kick = _normal_like(kick_key, consensus, _leading(moved))
      moved = jax.tree.map(
          lambda x, z: x + jnp.where(resample, resample_std * dt**0.5, 0.0)
          * z, moved, kick)
    particles = moved if update_all_particles or index is None else (
        _put(state.particles, index, moved))

    keep = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(any_finite, n, o), new, old)
    particles = keep(particles, state.particles)
    consensus = keep(consensus, state.consensus)
    next_alpha = jnp.minimum(state.alpha * alpha_growth, alpha_max)
    if target_ess is not None:
      next_alpha = jnp.where(any_finite, step_alpha, state.alpha)
    step_update = jax.tree.map(
        lambda c, p: jnp.where(any_finite, c - p, 0).astype(
            jnp.result_type(p)), consensus, params)
    value = objective(params)
    return step_update, CBOState(
        key=key, particles=particles, alpha=next_alpha, consensus=consensus,
        resamplings=state.resamplings + (resample & any_finite).astype(
            jnp.int32),
        stats=state.stats.record(value, any_finite))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _validate(num_particles, alpha, drift, noise, dt, noise_kind, init_std,
              particle_batch, alpha_growth, alpha_max, target_ess,
              resample_tol, resample_std):
  if (isinstance(num_particles, bool) or not isinstance(num_particles, int)
      or num_particles < 2):
    raise ValueError(
        f'num_particles must be an integer >= 2, got {num_particles!r}.')
  for name, value, lower, strict in (
      ('alpha', alpha, 0.0, True), ('dt', dt, 0.0, True),
      ('drift', drift, 0.0, False), ('noise', noise, 0.0, False),
      ('init_std', init_std, 0.0, False), ('alpha_growth', alpha_growth,
                                           1.0, False),
      ('alpha_max', alpha_max, 0.0, True),
      ('resample_std', resample_std, 0.0, False)):
    if not (value > lower if strict else value >= lower):
      raise ValueError(f'{name} must be {">" if strict else ">="} {lower}, '
                       f'got {value!r}.')
  checks.validate_choice('noise_kind', noise_kind, NOISE_KINDS)
  if particle_batch is not None:
    checks.validate_positive_int('particle_batch', particle_batch)
    if num_particles % particle_batch:
      raise ValueError(
          f'particle_batch ({particle_batch}) must divide num_particles '
          f'({num_particles}).')
  if target_ess is not None:
    if not 0.0 < target_ess <= 1.0:
      raise ValueError(f'target_ess must be in (0, 1], got {target_ess!r}.')
    if alpha_growth != 1.0:
      raise ValueError('use either alpha_growth or target_ess, not both.')
  if resample_tol is not None and not resample_tol > 0:
    raise ValueError(f'resample_tol must be > 0, got {resample_tol!r}.')


def _as_float32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _leading(tree) -> int:
  return jax.tree.leaves(tree)[0].shape[0]


def _normal_like(key, tree, count):
  """N(0, I) draws shaped ``(count,) + leaf.shape`` for every leaf."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [
      jax.random.normal(k, (count,) + jnp.shape(x), jnp.float32)
      for k, x in zip(keys, leaves)])


def _interaction_indices(epoch_key, step, num_particles, particle_batch):
  """Indices of this step's mini-batch (``None``: all particles).

  Epochs of ``N / M`` steps walk through one random permutation each, drawn
  from ``epoch_key`` and the epoch number.
  """
  if particle_batch is None:
    return None
  per_epoch = num_particles // particle_batch
  epoch, position = jnp.divmod(step, per_epoch)
  order = jax.random.permutation(jax.random.fold_in(epoch_key, epoch),
                                 num_particles)
  return jax.lax.dynamic_slice(order, (position * particle_batch,),
                               (particle_batch,))


def _take(particles, index):
  if index is None:
    return particles
  return jax.tree.map(lambda x: x[index], particles)


def _put(particles, index, values):
  return jax.tree.map(lambda x, v: x.at[index].set(v), particles, values)


def _consensus(particles, energies, alpha):
  r""":math:`\sum_i \mathrm{softmax}(-\alpha E)_i X^i` (log-sum-exp stable)."""
  weights = jax.nn.softmax(-alpha * energies)
  return jax.tree.map(lambda x: jnp.tensordot(weights, x, axes=1), particles)


def _euler_maruyama(particles, consensus, key, *, drift, noise, dt,
                    noise_kind):
  """One CBO step of every given particle towards ``consensus``."""
  deltas = jax.tree.map(lambda x, v: x - v[None], particles, consensus)
  xis = _normal_like(key, consensus, _leading(particles))
  if noise_kind == 'isotropic':
    norms = jnp.sqrt(sum(
        jnp.sum(jnp.square(d).reshape(d.shape[0], -1), axis=1)
        for d in jax.tree.leaves(deltas)))
    scale = lambda d: norms.reshape((-1,) + (1,) * (d.ndim - 1))
  else:
    scale = lambda d: d
  return jax.tree.map(
      lambda x, d, xi: x - drift * dt * d + noise * dt**0.5 * scale(d) * xi,
      particles, deltas, xis)


def _alpha_for_ess(energies, eta, alpha_max):
  r"""The :math:`\alpha \le \alpha_{max}` whose effective sample size is
  ``eta`` times the number of particles (bisection in :math:`\log\alpha`)."""
  count = energies.shape[0]
  finite = jnp.isfinite(energies)
  shifted = jnp.where(finite, energies - jnp.min(energies), jnp.inf)

  def ess_fraction(log_alpha):
    logw = -jnp.exp(log_alpha) * shifted
    # (sum w)^2 / sum w^2 in logs: 2 lse(logw) - lse(2 logw)
    log_ess = (2 * jax.nn.logsumexp(logw) - jax.nn.logsumexp(2 * logw))
    return jnp.exp(log_ess) / count

  def bisect(_, bounds):
    low, high = bounds
    middle = 0.5 * (low + high)
    too_hot = ess_fraction(middle) < eta  # alpha too large: ESS too small
    return (jnp.where(too_hot, low, middle), jnp.where(too_hot, middle, high))

  low, high = jnp.log(1e-8), jnp.log(jnp.asarray(alpha_max, jnp.float32))
  low, _ = jax.lax.fori_loop(0, _ESS_BISECTION_STEPS, bisect, (low, high))
  return jnp.exp(low)
