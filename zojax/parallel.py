"""Queries and data over the axes of a device mesh (see ``README.md``,
"Scaling out").

Every estimator and optimizer takes ``mesh=``, ``query_axis=`` and
``data_axis=``; this module holds the pieces they share and helpers for
running them on one device, many devices and many hosts.
"""

from zojax._src.parallel import Parallelism
from zojax._src.parallel import evaluate_points
from zojax._src.parallel import parallelism
from zojax._src.parallel import shard_batch

__all__ = ('Parallelism', 'evaluate_points', 'parallelism', 'shard_batch')
