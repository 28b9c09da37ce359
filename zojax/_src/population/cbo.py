r"""CBO: consensus-based optimization with particles in the optimizer state."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from zojax._src.core import checks
from zojax._src.core import keys
from zojax._src.core.base import ZerothOrderTransform
from zojax._src.core.stats import EstimateStats
from zojax._src.population.base import PopulationMethod, as_float32
from zojax._src.population.base import normal_like, population_transform
from zojax._src.query import sharding

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
    consensus_shifts: how far the consensus moved in each of the last
      ``resample_patience`` steps, newest first (0 where none is recorded
      yet).
    batch_key: the key of the mini-batch permutations (fixed).
    batch_order: with ``particle_batch``, the permutation of the current
      epoch (drawn once per epoch); otherwise empty.
    stats: evaluation counters for :func:`zojax.estimate_info`.
  """

  key: jax.Array
  particles: Any
  alpha: jax.Array
  consensus: Any
  resamplings: jax.Array
  consensus_shifts: jax.Array
  batch_key: jax.Array
  batch_order: jax.Array
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
    resample_patience: int = 5,
    resample_std: float = 0.1,
    batch_size: Optional[int] = None,
    seed=0,
    mesh: Optional[jax.sharding.Mesh] = None,
    query_axis: Optional[str] = None,
    particle_axis: Optional[str] = None,
) -> ZerothOrderTransform:
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

  **Variants** (CBXpy's options, with CBXpy's semantics):

  * ``particle_batch=M``: random mini-batch interaction. Each step takes the
    next ``M`` particles of a random permutation (a new one every ``N/M``
    steps, so each particle is used once per epoch), computes the consensus
    from them and moves only them (or all particles with
    ``update_all_particles=True``). ``M`` must divide ``N``.
  * ``alpha_growth``: :math:`\alpha \leftarrow \min(\gamma\alpha,
    \alpha_{max})` after every step (CBXpy's default scheduler uses
    :math:`\gamma` = 1.05, :math:`\alpha_{max}` = 1e5).
  * ``target_ess=eta``: instead, after every step, the :math:`\alpha \le
    \alpha_{max}` of the next step is the one whose weights on this step's
    values have the effective sample size
    :math:`(\sum_i w_i)^2 / \sum_i w_i^2 = \eta\,n`, :math:`n` the number of
    evaluated particles (bisection in :math:`\log\alpha`; Carrillo,
    Hoffmann, Stuart & Vaes, 2022). As CBXpy's ``effective_sample_size``
    scheduler, it runs after the step, so the first step uses ``alpha``.
    With ``particle_batch``, :math:`n = M` and the values are the batch's
    (CBXpy keeps every particle's last value, :math:`+\infty` before its
    first evaluation, and takes :math:`n = N`).
  * ``resample_tol``: CBXpy's resampling on consensus stagnation
    (``consensus_stagnation`` with ``patience`` = ``resample_patience``).
    From the second step on, the distance :math:`\|v^k - v^{k-1}\|_2` the
    consensus moved is recorded; after a step in which the last (up to)
    ``resample_patience`` recorded distances are all below
    ``resample_tol``, *every* particle (all :math:`N`, with or without
    ``particle_batch``) gets :math:`X^i \leftarrow X^i + \rho\sqrt{dt}\,
    \xi^i`, :math:`\rho` = ``resample_std`` (CBXpy's ``sigma_indep``). As in
    CBXpy, a resampling does not clear the record.

  **Noisy objectives**: the particles' values are recomputed every step from
  the ``obj_fn`` passed to that step, so a closure over a fresh data batch per
  step (or ``batch=`` with ``obj_fn(params, batch)``) gives CBO on a
  stochastic objective.

  **Cost**: ``N`` (or ``M``) evaluations per step, plus one at ``params``
  (reported as ``estimate_info(state).value``), evaluated in ``vmap`` chunks
  of ``batch_size``, split over ``mesh`` axis ``query_axis`` when given.
  Non-finite values get zero weight; if no value is finite the step leaves
  the particles unchanged, returns a NaN update (``optax.apply_if_finite``
  skips it) and counts as skipped.

  Ask/tell: ``ask(state, params)`` returns the particles to evaluate and,
  last, ``params``; ``tell`` takes their values.

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
    resample_patience: how many of the last consensus moves must all be
      below ``resample_tol`` (CBXpy's default 5).
    resample_std: size of the resampling kick (times :math:`\sqrt{dt}`).
    batch_size: particles evaluated at once; ``None`` = all.
    seed: an integer or a PRNG key.
    mesh, query_axis: evaluate the particles split over this mesh axis
      (see :mod:`zojax.parallel`; the evaluated count must be a multiple of
      its size).
    particle_axis: the former name of ``query_axis``.

  Returns:
    A :class:`zojax.ZerothOrderTransform` whose ``update`` needs ``obj_fn``
    (scoring one parameter pytree).

  References:
    Pinnau, Totzeck, Tse & Martin, A consensus-based model for global
    optimization, M3AS 2017; Carrillo, Jin, Li & Zhu, A consensus-based global
    optimization method for high dimensional machine learning problems,
    ESAIM:COCV 2021; Carrillo, Hoffmann, Stuart & Vaes, Consensus-based
    sampling, Stud. Appl. Math. 2022; Riedl, Klock, Geldhauser & Fornasier,
    Gradient is All You Need?, 2023; Bailo et al., CBX: Python and Julia
    packages for consensus-based interacting particle methods, JOSS 2024.
  """

  _validate(num_particles, alpha, drift, noise, dt, noise_kind, init_std,
            particle_batch, alpha_growth, alpha_max, target_ess, resample_tol,
            resample_patience, resample_std)
  num_particles = int(num_particles)
  particle_batch = checks.as_int(particle_batch)
  evaluated = particle_batch or num_particles
  per_epoch = num_particles // evaluated  # steps per mini-batch epoch

  def init(key, params):
    particle_key, batch_key = keys.split(key)
    start = as_float32(params)
    particles = jax.tree.map(lambda x, z: x[None] + init_std * z, start,
                             normal_like(particle_key, start, num_particles))
    return CBOState(key=key, particles=particles,
                    alpha=jnp.asarray(alpha, jnp.float32), consensus=start,
                    resamplings=jnp.zeros((), jnp.int32),
                    consensus_shifts=jnp.zeros((int(resample_patience),),
                                               jnp.float32),
                    batch_key=batch_key, batch_order=_epoch_order(
                        batch_key, 0, num_particles if particle_batch else 0),
                    stats=None)

  def indices(state):
    if particle_batch is None:
      return None
    start = _taken(state) % per_epoch * particle_batch
    return jax.lax.dynamic_slice(state.batch_order, (start,), (evaluated,))

  def candidates(state, params, step_key):
    del params, step_key
    return _take(state.particles, indices(state))

  def advance(state, params, chosen, energies, step_key):
    del params
    noise_key, kick_key = keys.split(step_key)
    energies = jnp.where(jnp.isfinite(energies), energies, jnp.inf)
    consensus = _consensus(chosen, energies, state.alpha)
    moved = state.particles if update_all_particles else chosen
    moved = _euler_maruyama(moved, consensus, noise_key, drift=drift,
                            noise=noise, dt=dt, noise_kind=noise_kind)
    particles = moved if update_all_particles else _put(
        state.particles, indices(state), moved)
    shifts, resample = state.consensus_shifts, jnp.zeros((), bool)
    if resample_tol is not None:
      shifts, resample = _stagnation(
          shifts, _distance(consensus, state.consensus), _taken(state) > 0,
          resample_tol)
      particles = _kick(particles, resample, kick_key, resample_std * dt**0.5)
    if target_ess is not None:  # after the step, for the next one (CBXpy)
      next_alpha = _alpha_for_ess(energies, target_ess, alpha_max)
    else:
      next_alpha = jnp.minimum(state.alpha * alpha_growth, alpha_max)
    order = state.batch_order
    if particle_batch is not None:
      order = _next_order(order, state.batch_key, _taken(state), per_epoch)
    return consensus, state._replace(
        particles=particles, alpha=next_alpha, consensus=consensus,
        resamplings=state.resamplings + resample.astype(jnp.int32),
        consensus_shifts=shifts, batch_order=order), jnp.nan

  method = PopulationMethod('cbo', CBOState, evaluated, True, init,
                            candidates, advance)
  return population_transform(
      method, seed=seed, batch_size=batch_size,
      plan=sharding.parallelism(mesh, query_axis=query_axis or particle_axis))


def _validate(num_particles, alpha, drift, noise, dt, noise_kind, init_std,
              particle_batch, alpha_growth, alpha_max, target_ess,
              resample_tol, resample_patience, resample_std):
  checks.validate_positive_int('num_particles', num_particles, minimum=2)
  checks.validate_positive_int('resample_patience', resample_patience)
  for name, value, lower, strict in (
      ('alpha', alpha, 0.0, True), ('dt', dt, 0.0, True),
      ('drift', drift, 0.0, False), ('noise', noise, 0.0, False),
      ('init_std', init_std, 0.0, False), ('alpha_growth', alpha_growth,
                                           1.0, False),
      ('alpha_max', alpha_max, 0.0, True),
      ('resample_std', resample_std, 0.0, False)):
    if checks.is_concrete_number(value) and not (
        value > lower if strict else value >= lower):
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


def _leading(tree) -> int:
  return jax.tree.leaves(tree)[0].shape[0]


def _taken(state) -> jax.Array:
  """Steps taken so far (a skipped step keeps the state: it is not one)."""
  return state.stats.steps - state.stats.skipped_steps


def _epoch_order(batch_key, epoch, num_particles):
  """Epoch ``epoch``'s random permutation of the particles."""
  return jax.random.permutation(
      keys.typed(keys.fold_in(batch_key, epoch)), num_particles)


def _next_order(order, batch_key, taken, per_epoch):
  """The permutation of the next step: epochs of ``per_epoch`` = N / M steps
  walk through one permutation each, drawn when the epoch begins (once, not
  every step: a permutation is a sort, slow for large N)."""
  upcoming = taken + 1
  return jax.lax.cond(
      upcoming % per_epoch == 0,
      lambda: _epoch_order(batch_key, upcoming // per_epoch, order.shape[0]),
      lambda: order)


def _take(particles, index):
  if index is None:
    return particles
  return jax.tree.map(lambda x: x[index], particles)


def _put(particles, index, values):
  if index is None:
    return values
  return jax.tree.map(lambda x, v: x.at[index].set(v), particles, values)


def _distance(tree, other) -> jax.Array:
  """The 2-norm of ``tree - other`` over all leaves."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(a - b)) for a, b in zip(
      jax.tree.leaves(tree), jax.tree.leaves(other))))


def _stagnation(shifts, shift, taken, tol):
  """CBXpy's ``consensus_stagnation``: once a previous consensus exists
  (``taken``), push the move ``shift`` into the window ``shifts`` (0 =
  unrecorded); resample if every recorded move is below ``tol``."""
  shifts = jnp.where(taken, jnp.roll(shifts, 1).at[0].set(shift), shifts)
  return shifts, taken & (jnp.max(shifts) < tol)


def _kick(particles, resample, key, scale):
  r"""CBXpy's resampling: :math:`X^i \leftarrow X^i + \text{scale}\,\xi^i`
  for every particle, if ``resample``."""
  def kicked(tree):
    xis = normal_like(key, jax.tree.map(lambda x: x[0], tree), _leading(tree))
    return jax.tree.map(lambda x, xi: x + scale * xi, tree, xis)

  return jax.lax.cond(resample, kicked, lambda tree: tree, particles)


def _consensus(particles, energies, alpha):
  r""":math:`\sum_i \mathrm{softmax}(-\alpha E)_i X^i` (log-sum-exp stable)."""
  weights = jax.nn.softmax(-alpha * energies)
  return jax.tree.map(lambda x: jnp.tensordot(weights, x, axes=1), particles)


def _euler_maruyama(particles, consensus, key, *, drift, noise, dt,
                    noise_kind):
  """One CBO step of every given particle towards ``consensus``."""
  deltas = jax.tree.map(lambda x, v: x - v[None], particles, consensus)
  xis = normal_like(key, consensus, _leading(particles))
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
