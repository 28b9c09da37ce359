r"""The query engine: every chunked evaluation in zojax runs through here.

Direction-based estimators have the form

.. math::
  \hat g = s \sum_{i=1}^{q} c_i\, d_i ,

with directions :math:`d_i` (random vectors, unit coordinate vectors, rows
of an orthonormal matrix, a seed pool's members), a scalar *probe*
:math:`c_i` of the objective along :math:`d_i` (:mod:`zojax._src.query.
probes`: a finite difference, a JVP, a sign, a rank weight, a value handed
in by ``tell``) and a constant :math:`s`. :func:`weighted_direction_sum`
evaluates that sum:

1. directions are generated on demand from their index (never stored beyond
   one chunk),
2. the probes of a chunk of ``batch_size`` directions run as one ``vmap``;
   chunks run one after the other under ``lax.scan`` (:func:`chunked`), so
   memory is bounded by ``batch_size`` perturbed copies of the parameters,
3. each chunk's directions are contracted with its coefficients into a
   float32 accumulator while they are still in memory,
4. with a query axis (:mod:`zojax._src.query.sharding`), each device takes
   its share of the indices and the sums meet in one ``psum``.

:func:`evaluate_points` evaluates a function at stacked points (an ``ask``
batch, a population) with the same chunking and sharding. Everything is
traced once per configuration: no Python loop runs over queries.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from zojax._src.core import backend
from zojax._src.core.perturbable import Perturbable
from zojax._src.query import sharding

Direction = tuple[jax.Array, ...]
# probe(index, direction) -> (coefficient c_i, auxiliary outputs of that probe)
Probe = Callable[[jax.Array, Direction], tuple[jax.Array, Any]]


def chunked(body: Callable[[Any, jax.Array], tuple[Any, Any]],
            indices: jax.Array, batch_size: Optional[int],
            carry: Any) -> tuple[Any, Any]:
  """``body(carry, chunk_indices) -> (carry, per_index_outputs)`` over the
  indices in chunks of ``batch_size`` (``None``: one chunk), under
  ``lax.scan``, plus one call for a remainder. Returns the final carry and
  the per-index outputs concatenated (leading axis ``len(indices)``)."""
  count = indices.shape[0]
  chunk = count if batch_size is None else max(1, min(batch_size, count))
  num_full, remainder = divmod(count, chunk)
  outputs = []
  if num_full == 1:
    carry, out = body(carry, indices[:chunk])
    outputs.append(out)
  elif num_full > 1:
    carry, out = jax.lax.scan(
        body, carry, indices[:num_full * chunk].reshape(num_full, chunk))
    outputs.append(jax.tree.map(
        lambda x: x.reshape((num_full * chunk,) + x.shape[2:]), out))
  if remainder:
    carry, out = body(carry, indices[num_full * chunk:])
    outputs.append(out)
  return carry, jax.tree.map(lambda *xs: jnp.concatenate(xs), *outputs)


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
    batch_size: Optional[int],
    plan: Optional[sharding.Parallelism] = None,
) -> tuple[Direction, Any]:
  r"""Returns :math:`\sum_i c_i d_i` (float32, active leaves) and stacked aux.

  Args:
    directions: the directions :math:`d_i`, ``i = 0 .. count-1``.
    probe: computes :math:`c_i` (and any auxiliary outputs, e.g. objective
      values) from ``(i, d_i)``; it is ``vmap``-ed over a chunk.
    batch_size: directions probed at once (the ``vmap`` width) on each
      device; ``None`` probes all (of the device's share) at once.
    plan: with a query axis, this runs inside ``sharding.run`` and each
      device probes its share of the directions; the sum and the aux are
      then combined over the axis.

  Returns:
    ``(accumulated, aux)``, where ``aux`` has a leading axis of ``count``.
  """
  def body(accumulated, chunk_indices):
    compact = jax.vmap(directions.make)(chunk_indices)
    coefficients, aux = jax.vmap(
        lambda i, c: probe(i, directions.expand(c)))(chunk_indices, compact)
    coefficients = coefficients.astype(jnp.float32)
    if directions.accumulate is not None:
      return directions.accumulate(accumulated, coefficients, compact), aux
    batch = jax.vmap(directions.expand)(compact)
    return tuple(acc + _contract(coefficients, d)
                 for acc, d in zip(accumulated, batch)), aux

  zeros = tuple(jnp.zeros(shape, jnp.float32)
                for shape in directions.space.shapes)
  indices = sharding.local_query_indices(directions.count, plan)
  accumulated, aux = chunked(body, indices, batch_size, zeros)
  return sharding.gather_queries(accumulated, aux, plan)


def coefficient_sum(directions: Directions, coefficients: jax.Array,
                    batch_size: Optional[int]) -> Direction:
  r""":math:`\sum_i c_i d_i` for known coefficients (``tell``, seed pools)."""
  accumulated, _ = weighted_direction_sum(
      directions, lambda i, d: (coefficients[i], ()), batch_size)
  return accumulated


def _contract(coefficients: jax.Array, batch: jax.Array) -> jax.Array:
  """``sum_i coefficients[i] * batch[i]``.

  On accelerators a multiply-and-reduce, which XLA fuses with the expansion
  of compact directions (nothing of size chunk x d is written to memory); a
  dot would first materialise its operand. XLA:CPU compiles that reduction
  over the leading axis into a slow loop, so the CPU uses a dot.
  """
  if not backend.on_accelerator():
    return jnp.tensordot(coefficients, batch, axes=1)
  weights = coefficients.reshape((-1,) + (1,) * (batch.ndim - 1))
  return jnp.sum(weights * batch, axis=0)


def stacked_points(directions: Directions, offsets: jax.Array) -> Any:
  """All points ``params + offset * d_i`` as a pytree with a leading axis,
  direction-major: ``(d_0, o_0), (d_0, o_1), (d_1, o_0), ...`` (``ask``)."""
  space = directions.space

  def points_along(index):
    direction = directions.direction(index)
    return jax.vmap(lambda s: space.shifted(direction, s))(offsets)

  points = jax.vmap(points_along)(jnp.arange(directions.count, dtype=jnp.int32))
  return jax.tree.map(
      lambda x: x.reshape((directions.count * offsets.shape[0],) + x.shape[2:]),
      points)


def finish_estimate(directions: Directions, accumulated: Direction,
                    finite: jax.Array) -> Any:
  """Scales the accumulated sum and casts it to the params' dtypes; NaN
  everywhere if a value of the step was not finite (optax's convention:
  ``optax.apply_if_finite`` downstream then skips the whole step)."""
  scaled = tuple(jnp.where(finite, directions.scale * acc, jnp.nan)
                 for acc in accumulated)
  return directions.space.embed(scaled)


def nan_unless(finite: jax.Array, tree: Any) -> Any:
  """``tree`` where ``finite``, NaN (in each leaf's dtype) otherwise."""
  return jax.tree.map(
      lambda x: jnp.where(finite, x, jnp.asarray(jnp.nan, x.dtype)), tree)


def evaluate_points(
    fn: Callable[[Any], jax.Array],
    points: Any,
    *,
    batch_size: Optional[int] = None,
    plan: Optional[sharding.Parallelism] = None,
) -> jax.Array:
  """``fn`` at every point of a stacked pytree (float32 vector), chunked by
  ``batch_size`` and, with a query axis in ``plan``, split over it."""
  value = lambda p: jnp.asarray(fn(p), jnp.float32)

  def values_of(stacked):
    count = jax.tree.leaves(stacked)[0].shape[0]
    if batch_size is None or batch_size >= count:
      return jax.vmap(value)(stacked)

    def body(carry, chunk_indices):
      chunk = jax.tree.map(lambda x: x[chunk_indices], stacked)
      return carry, jax.vmap(value)(chunk)

    return chunked(body, jnp.arange(count), batch_size, ())[1]

  if plan is None or plan.query_axis is None:
    return values_of(points)
  count = jax.tree.leaves(points)[0].shape[0]
  if count % plan.query_devices:
    raise ValueError(
        f'{count} points do not split evenly over the {plan.query_devices} '
        f'devices of mesh axis {plan.query_axis!r}.')
  spec = sharding.P(plan.query_axis)
  return jax.shard_map(values_of, mesh=plan.mesh, in_specs=(spec,),
                       out_specs=spec, check_vma=False)(
                           *sharding.in_layout(plan.mesh, (points,), (spec,)))
