r"""Deep GA: a genetic algorithm with truncation selection and elitism."""

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


class GAState(NamedTuple):
  """State of :func:`zojax.ga` (a plain pytree of arrays).

  Attributes:
    key: PRNG key, split every step.
    population: the individuals, a pytree like ``params`` (float32 leaves)
      with a leading axis of ``population_size``; the first ``num_elites``
      are the previous generation's best, unmodified.
    stats: evaluation counters for :func:`zojax.estimate_info`.
  """

  key: jax.Array
  population: Any
  stats: EstimateStats


def ga(
    population_size: int,
    sigma,
    *,
    truncation: int,
    num_elites: int = 1,
    batch_size: Optional[int] = None,
    seed=0,
    mesh: Optional[jax.sharding.Mesh] = None,
    query_axis: Optional[str] = None,
) -> ZerothOrderTransform:
  r"""Deep GA (Such et al., 2017) as an optax transform.

  A population of :math:`N` = ``population_size`` individuals lives in the
  state; the first starts at ``params``, the others at ``params`` +
  :math:`\sigma\epsilon`. Every step (a generation) evaluates all :math:`N`
  and builds the next population:

  * the ``num_elites`` :math:`E` best individuals are kept unmodified
    (elitism), first;
  * each of the :math:`N - E` others is a child of a parent drawn uniformly
    from the top :math:`T` = ``truncation`` (truncation selection), mutated
    by Gaussian noise: :math:`\theta' = \theta_{\text{parent}} +
    \sigma\epsilon`, :math:`\epsilon \sim N(0, I)` (no crossover, as in the
    paper).

  ``update`` returns ``best - params`` (the best individual of the
  generation just evaluated), like :func:`zojax.cbo`: an update, not a
  gradient. Lower objective values are better. ``estimate_info(state).value``
  is the best value of the generation; a step costs :math:`N` evaluations
  (the elites are evaluated again every generation, so a noisy objective
  cannot keep a lucky elite for ever; the paper instead re-evaluates the
  elite candidates on extra episodes).

  Representation: the population is stored explicitly, :math:`N d` float32
  numbers. The paper's compressed form (an individual as the list of its
  ancestors' seeds, regenerated on demand) needs memory that grows with the
  generations and variable-length lists; the explicit form keeps the state
  a fixed-shape pytree (one compilation, checkpointable) at the price of
  :math:`N` copies of the parameters.

  Args:
    population_size: :math:`N` (>= 2).
    sigma: the mutation power :math:`\sigma` (a float, an optax schedule of
      the generation count, or a traced value).
    truncation: :math:`T`, how many of the best are parents (1 <= T <= N).
    num_elites: :math:`E`, kept unmodified (0 <= E < N).
    batch_size: individuals evaluated at once (``vmap`` chunk); ``None`` =
      all.
    seed: an integer or a PRNG key.
    mesh, query_axis: evaluate the individuals split over this mesh axis
      (``population_size`` must be a multiple of its size).

  Returns:
    A :class:`zojax.ZerothOrderTransform` whose ``update`` needs ``obj_fn``;
    ``ask``/``tell`` give the population and take its values.

  References:
    Such, Madhavan, Conti, Lehman, Stanley & Clune, Deep Neuroevolution:
    Genetic Algorithms Are a Competitive Alternative for Training Deep
    Neural Networks for Reinforcement Learning, 2017 (arXiv:1712.06567).
  """
  checks.validate_positive_int('population_size', population_size,
                               minimum=2)
  checks.validate_positive_int('truncation', truncation)
  checks.validate_positive_int('num_elites', num_elites, minimum=0)
  checks.validate_sigma(sigma)
  size, parents, elites = int(population_size), int(truncation), int(
      num_elites)
  if parents > size or elites >= size:
    raise ValueError(f'need truncation <= population_size and num_elites < '
                     f'population_size; got {parents}, {elites}, {size}.')

  def init(key, params):
    start = as_float32(params)
    mutations = normal_like(key, start, size)
    first = jnp.arange(size) == 0  # individual 0 is params itself
    population = jax.tree.map(
        lambda x, z: x[None] + jnp.where(
            first.reshape((-1,) + (1,) * x.ndim), 0.0, sigma_at(0) * z),
        start, mutations)
    return GAState(key, population, None)

  def sigma_at(step):
    return checks.value_at(sigma, step)

  def candidates(state, params, step_key):
    del params, step_key
    return state.population

  def advance(state, params, population, values, step_key):
    del params
    order = jnp.argsort(jnp.where(jnp.isfinite(values), values, jnp.inf))
    parent_key, mutation_key = keys.split(step_key)
    chosen = jax.random.randint(keys.typed(parent_key),
                                (size - elites,), 0, parents)
    lineage = jnp.concatenate([order[:elites], order[chosen]])
    noise = normal_like(mutation_key, jax.tree.map(lambda x: x[0],
                                                   population), size)
    mutate = (jnp.arange(size) >= elites) * sigma_at(state.stats.steps)
    offspring = jax.tree.map(
        lambda x, z: x[lineage] + mutate.reshape((-1,) + (1,) * (
            x.ndim - 1)) * z, population, noise)
    best = jax.tree.map(lambda x: x[order[0]], population)
    return best, state._replace(population=offspring), values[order[0]]

  method = PopulationMethod('ga', GAState, size, False, init, candidates,
                            advance)
  return population_transform(
      method, seed=seed, batch_size=batch_size,
      plan=sharding.parallelism(mesh, query_axis=query_axis))
