r"""The query engine shared by every direction-based estimator.

Every estimator in zojax has the form

.. math::
  \hat g = s \sum_{i=1}^{q} c_i\, d_i ,

where :math:`d_i` are directions (random vectors for RGE, unit coordinate
vectors for CGE), :math:`c_i` is a scalar *probe* of the objective along
:math:`d_i` (a finite difference, a JVP, a sign of one, or a value handed in by
``tell``) and :math:`s` is a constant. This module evaluates that sum:

1. directions are generated on demand from their index (never stored beyond
   one chunk),
2. the probes of a chunk of ``batch_size`` directions run as one ``vmap``;
   chunks run one after the other under ``lax.scan``, so memory is bounded by
   ``batch_size`` perturbed copies of the parameters,
3. each chunk's directions are contracted with its coefficients into a float32
   accumulator while they are still in memory.

Everything is traced once per configuration: no Python loop runs over queries.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from zojax._src import backend
from zojax._src import parallel
from zojax._src.perturbable import Perturbable

Direction = tuple[jax.Array, ...]
# probe(index, direction) -> (coefficient c_i, auxiliary outputs of that probe)
Probe = Callable[[jax.Array, Direction], tuple[jax.Array, Any]]


class Directions(NamedTuple):
  """A step's directions, generated on demand.

  Attributes:
    count: number of directions (static).
    make: ``index -> compact direction`` (any tuple of arrays).
    scale: the constant :math:`s` of the estimate.
    space: the parameters the directions live in.
    expand: ``compact -> direction`` (a tuple of float32 arrays, one per
      active leaf of ``space``). Splitting generation in two lets the
      expensive part (random bits) be materialised once per chunk in compact
      form while the cheap part (unpacking bits to ±1) is fused by XLA into
      each consumer. Defaults to the identity.
    accumulate: optional ``(accumulated, coefficients, compact_batch) ->
      accumulated`` replacing the dense contraction with the chunk's
      directions; for sparse directions (CGE's unit vectors) a scatter-add
      is O(chunk) instead of O(chunk * d).
  """

  count: int
  make: Callable[[jax.Array], Any]
  scale: Any
  space: Perturbable
  expand: Callable[[Any], Direction] = lambda compact: compact
  accumulate: Optional[Callable[[Direction, jax.Array, Any], Direction]] = None

  def direction(self, index: jax.Array) -> Direction:
    return self.expand(self.make(index))


def weighted_direction_sum(
    directions: Directions,
    probe: Probe,
    batch_size: int | None,
    plan: Optional[parallel.Parallelism] = None,
) -> tuple[Direction, Any]:
  r"""Returns :math:`\sum_i c_i d_i` (float32, active leaves) and stacked aux.

  Args:
    directions: the directions :math:`d_i`, ``i = 0 .. count-1``.
    probe: computes :math:`c_i` (and any auxiliary outputs, e.g. objective
      values) from ``(i, d_i)``; it is ``vmap``-ed over a chunk.
    batch_size: directions probed at once (the ``vmap`` width) on each
      device; ``None`` probes all (of the device's share) at once. Memory is
      bounded by about ``batch_size`` expanded directions and perturbed
      parameter copies.
    plan: with a query axis, this runs inside :func:`zojax.parallel` 's
      ``run`` and each device probes its share of the directions; the sum
      and the aux are then combined over the axis (equal to the unsharded
      result up to float summation order).

  Returns:
    ``(accumulated, aux)``, where ``aux`` has a leading axis of ``count``.
  """
  indices = parallel.local_query_indices(directions.count, plan)
  accumulated, aux = _chunked_sum(directions, probe, batch_size, indices)
  return parallel.gather_queries(accumulated, aux, plan)


def _chunked_sum(directions, probe, batch_size, indices):
  """:func:`weighted_direction_sum` over the given direction indices."""
  count = indices.shape[0]
  chunk = count if batch_size is None else min(batch_size, count)

  def run_chunk(accumulated, chunk_indices):
    compact = jax.vmap(directions.make)(chunk_indices)
    coefficients, aux = jax.vmap(
        lambda i, c: probe(i, directions.expand(c)))(chunk_indices, compact)
    coefficients = coefficients.astype(jnp.float32)
    if directions.accumulate is not None:
      return directions.accumulate(accumulated, coefficients, compact), aux
    batch = jax.vmap(directions.expand)(compact)
    accumulated = tuple(
        acc + _contract(coefficients, d) for acc, d in zip(accumulated, batch))
    return accumulated, aux

  accumulated = tuple(
      jnp.zeros(shape, jnp.float32) for shape in directions.space.shapes)
  num_full, remainder = divmod(count, chunk)
  auxes = []
  if num_full == 1:
    accumulated, aux = run_chunk(accumulated, indices[:chunk])
    auxes.append(aux)
  elif num_full > 1:
    accumulated, aux = jax.lax.scan(
        run_chunk, accumulated,
        indices[:num_full * chunk].reshape(num_full, chunk))
    auxes.append(jax.tree.map(
        lambda x: x.reshape((num_full * chunk,) + x.shape[2:]), aux))
  if remainder:
    accumulated, aux = run_chunk(accumulated, indices[num_full * chunk:])
    auxes.append(aux)
  aux = jax.tree.map(lambda *xs: jnp.concatenate(xs), *auxes)
  return accumulated, aux


def _contract(coefficients: jax.Array, batch: jax.Array) -> jax.Array:
  """``sum_i coefficients[i] * batch[i]``.

  On accelerators a multiply-and-reduce, which XLA fuses with the expansion
  of compact directions (nothing of size chunk x d is written to memory); a
  dot would first materialise its operand. XLA:CPU compiles that reduction
  over the leading axis into a slow loop, so the CPU uses a dot (its chunks
  are small: the fastest ``batch_size`` on a CPU is 1-8).
  """
  if not backend.on_accelerator():
    return jnp.tensordot(coefficients, batch, axes=1)
  weights = coefficients.reshape((-1,) + (1,) * (batch.ndim - 1))
  return jnp.sum(weights * batch, axis=0)


def stacked_points(directions: Directions, steps: jax.Array) -> Any:
  """All points ``params + step * d_i`` as a pytree with leading axis.

  The points are ordered direction-major: for ``steps = (s_0, s_1)`` they are
  ``(d_0, s_0), (d_0, s_1), (d_1, s_0), ...``. Used by ``ask``.
  """
  space = directions.space

  def points_along(index):
    direction = directions.direction(index)
    return jax.vmap(lambda s: space.shifted(direction, s))(steps)

  points = jax.vmap(points_along)(jnp.arange(directions.count, dtype=jnp.int32))
  return jax.tree.map(
      lambda x: x.reshape((directions.count * len(steps),) + x.shape[2:]),
      points)


def finish_estimate(
    directions: Directions,
    accumulated: Direction,
    finite: jax.Array,
) -> Any:
  """Scales the accumulated sum, casts to params' dtypes, zeros if not finite.

  A step whose objective values were not all finite returns an exact zero
  update, so a NaN or inf from ``obj_fn`` never reaches the parameters.
  """
  scaled = tuple(
      jnp.where(finite, directions.scale * acc, 0.0) for acc in accumulated)
  return directions.space.embed(scaled)
