"""Queries and data over the axes of a device mesh (see ``README.md``,
"Scaling out").

Every estimator and optimizer takes ``mesh=``, ``query_axis=`` and
``data_axis=``; this module holds the pieces they share and helpers for
running them on one device, many devices and many hosts.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax

from zojax._src.query import engine
from zojax._src.query.sharding import Parallelism
from zojax._src.query.sharding import parallelism
from zojax._src.query.sharding import shard_batch

__all__ = ('Parallelism', 'evaluate_points', 'parallelism', 'shard_batch')


def evaluate_points(
    fn: Callable[[Any], jax.Array],
    points: Any,
    *,
    batch_size: Optional[int] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    axis: Optional[str] = None,
) -> jax.Array:
  """``fn`` at every point of a stacked pytree, chunked and sharded.

  ``points`` has a leading axis (e.g. the output of an estimator's ``ask``,
  or a population of particles). Points are evaluated ``batch_size`` at a
  time, and with a mesh split over ``axis`` (``jax.shard_map``; the number
  of points must be a multiple of the axis size). The same query layer as
  every estimator's.

  Returns:
    The values, a float32 vector with one entry per point.
  """
  return engine.evaluate_points(fn, points, batch_size=batch_size,
                                plan=parallelism(mesh, query_axis=axis))
