r"""Where a step's work runs: queries and data over the axes of a device mesh.

A zeroth-order step evaluates the objective at many points. zojax splits that
work two ways, both with ``jax.shard_map``:

* **perturbation (query) parallelism**, over ``query_axis``: each device takes
  an equal share of the step's directions, regenerates them from the shared
  step key (a direction is a pure function of its index), probes them and
  contributes its part of :math:`\sum_i c_i d_i` to one ``psum``;
* **data parallelism**, over ``data_axis``: the batch is split along its
  leading axis, each device evaluates the objective on its shard and the
  per-query values are averaged over the axis (``pmean``, a vector of scalars
  per chunk of queries).

Only scalars per query and the one summed estimate cross devices: the
parameters enter the map replicated (every device keeps its copy, as in data
parallel training) and each device builds the perturbed copies it needs
itself. On several hosts the same code runs after
``jax.distributed.initialize()`` (DistZO2's PertP + DDP; DeepZero's forward
parallelization).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from zojax._src.core import checks

P = jax.sharding.PartitionSpec


class Parallelism(NamedTuple):
  """The mesh of a step and the roles of its axes.

  Attributes:
    mesh: a ``jax.sharding.Mesh`` (e.g. from ``jax.make_mesh``).
    query_axis: the axis each step's queries are split over, or ``None``.
    data_axis: the axis the batch is split over, or ``None``. Mesh axes named
      by neither replicate the work.
  """

  mesh: jax.sharding.Mesh
  query_axis: Optional[str]
  data_axis: Optional[str]

  @property
  def query_devices(self) -> int:
    return 1 if self.query_axis is None else self.mesh.shape[self.query_axis]

  @property
  def data_devices(self) -> int:
    return 1 if self.data_axis is None else self.mesh.shape[self.data_axis]


def parallelism(
    mesh: Optional[jax.sharding.Mesh],
    query_axis: Optional[str] = None,
    data_axis: Optional[str] = None,
) -> Optional[Parallelism]:
  """Validates an estimator's ``mesh=``/``query_axis=``/``data_axis=``.

  With a 1-D mesh and neither axis named, the queries are split over it.
  Returns ``None`` when there is no mesh (everything runs where it is called).
  """
  if mesh is None:
    if query_axis is not None or data_axis is not None:
      raise ValueError('query_axis / data_axis were given without a mesh.')
    return None
  if query_axis is None and data_axis is None:
    if len(mesh.axis_names) != 1:
      raise ValueError(
          f'the mesh has axes {mesh.axis_names}: name the one the queries '
          'are split over with query_axis= (and the batch axis with '
          'data_axis=).')
    query_axis = mesh.axis_names[0]
  for role, axis in (('query_axis', query_axis), ('data_axis', data_axis)):
    if axis is not None and axis not in mesh.axis_names:
      raise ValueError(f'{role} {axis!r} is not an axis of the mesh '
                       f'{mesh.axis_names}.')
  if query_axis is not None and query_axis == data_axis:
    raise ValueError(f'query_axis and data_axis are both {query_axis!r}; '
                     'they must be different mesh axes.')
  return Parallelism(mesh, query_axis, data_axis)


def check_batch(batch: Any, plan: Optional[Parallelism]) -> None:
  """Raises a clear error unless ``batch`` can be split over the data axis."""
  data_axis = None if plan is None else plan.data_axis
  if data_axis is None:
    return
  if batch is None:
    raise ValueError(
        f'this estimator splits the batch over mesh axis {data_axis!r}: '
        'pass it to update() as batch=..., with obj_fn(params, batch).')
  devices = plan.data_devices
  for leaf in jax.tree.leaves(batch):
    shape = np.shape(leaf)
    if not shape or shape[0] % devices:
      raise ValueError(
          f'every leaf of batch needs a leading axis divisible by the '
          f'{devices} devices of data axis {data_axis!r}; got a leaf of '
          f'shape {shape}.')


def bind_objective(obj_fn: Callable[..., jax.Array], batch: Any,
                   plan: Optional[Parallelism]) -> Callable[[Any], jax.Array]:
  """The objective as a function of params alone (float32 scalar).

  Without a batch it is ``obj_fn(params)``. With one it is
  ``obj_fn(params, batch)``, and on a data axis (inside :func:`run`, where
  ``batch`` is this device's shard) the mean over the axis: equal to the
  objective on the whole batch when ``obj_fn`` averages over examples.
  """
  if batch is None:
    return lambda params: jnp.asarray(obj_fn(params), jnp.float32)
  data_axis = None if plan is None else plan.data_axis

  def objective(params):
    value = jnp.asarray(obj_fn(params, batch), jnp.float32)
    return value if data_axis is None else jax.lax.pmean(value, data_axis)

  return objective


def run(plan: Optional[Parallelism], step: Callable[..., Any], batch: Any,
        *replicated: Any) -> Any:
  """Runs ``step(batch, *replicated)`` on every device of the plan's mesh.

  ``step`` sees this device's shard of ``batch`` (split over the data axis,
  whole otherwise) and the ``replicated`` arguments whole (params, keys: pass
  arrays as arguments rather than closing over them, which meshes with
  Explicit axes do not allow). It must return values that are equal on every
  device (after its own ``psum``/``pmean``); they are returned once. Without
  a plan ``step(batch, *replicated)`` runs as is.
  """
  if plan is None:
    return step(batch, *replicated)
  batch_spec = P() if plan.data_axis is None else P(plan.data_axis)
  in_specs = (batch_spec,) + (P(),) * len(replicated)
  args = in_layout(plan.mesh, (batch,) + replicated, in_specs)
  # check_vma=False: loops inside the step carry device-varying accumulators
  # initialised from replicated zeros; the step's psums make outputs
  # replicated.
  return jax.shard_map(step, mesh=plan.mesh, in_specs=in_specs,
                       out_specs=P(), check_vma=False)(*args)


def in_layout(mesh, args: tuple, specs: tuple) -> tuple:
  """``args`` resharded to ``specs`` when the mesh has Explicit axes, which
  need the inputs of a ``shard_map`` in its layout first (Auto axes are
  resharded by ``shard_map`` itself)."""
  if not any(axis_type == jax.sharding.AxisType.Explicit
             for axis_type in mesh.axis_types):
    return args
  return tuple(jax.reshard(arg, jax.sharding.NamedSharding(mesh, spec))
               for arg, spec in zip(args, specs))


def local_query_indices(count: int,
                        plan: Optional[Parallelism]) -> jax.Array:
  """This device's share of the indices ``0 .. count-1`` (inside :func:`run`).

  Derived from the device's position on the query axis, so nothing but the
  shared step key is needed to regenerate its directions.
  """
  if plan is None or plan.query_axis is None:
    return jnp.arange(count, dtype=jnp.int32)
  devices = plan.query_devices
  if count % devices:
    raise ValueError(
        f'{count} queries per step do not split evenly over the {devices} '
        f'devices of mesh axis {plan.query_axis!r}; use a multiple of '
        f'{devices}.')
  per_device = count // devices
  first = jax.lax.axis_index(plan.query_axis) * per_device
  return first + jnp.arange(per_device, dtype=jnp.int32)


def gather_queries(accumulated: Any, per_query: Any,
                   plan: Optional[Parallelism]) -> tuple[Any, Any]:
  """Sums ``accumulated`` and concatenates ``per_query`` over the query axis."""
  if plan is None or plan.query_axis is None:
    return accumulated, per_query
  return (jax.lax.psum(accumulated, plan.query_axis),
          jax.lax.all_gather(per_query, plan.query_axis, tiled=True))


def shard_batch(batch: Any, mesh: jax.sharding.Mesh, data_axis: str) -> Any:
  """Places a batch on ``mesh``, split along its leading axis (``data_axis``).

  ``batch`` is the part of the global batch that *this process* holds: the
  whole batch in a single-process run; on several hosts (after
  ``jax.distributed.initialize()``) each process passes its own slice and the
  global batch is their concatenation in process order. Built on
  ``jax.make_array_from_process_local_data``.
  """
  sharding = jax.sharding.NamedSharding(mesh, P(data_axis))
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding,
                                                       np.asarray(x)), batch)


def check_objective(obj_fn, params, batch: Any,
                    plan: Optional[Parallelism]) -> None:
  """The batch splits over the data axis and the objective returns a real
  scalar (``obj_fn(params)``, or ``obj_fn(params, batch)``)."""
  check_batch(batch, plan)
  if batch is None:
    checks.check_scalar_objective(obj_fn, params)
  else:
    checks.check_scalar_objective(lambda p: obj_fn(p, batch), params)


def replicated(x: Any, plan: Optional[Parallelism]) -> Any:
  """``x`` laid out whole on every device of the plan's mesh (needed before
  operations that do not accept a sharded operand, e.g. a sort, on meshes
  with Explicit axes; a no-op otherwise)."""
  if plan is None:
    return x
  return in_layout(plan.mesh, (x,), (P(),))[0]
