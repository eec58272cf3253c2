"""The collectives layer: one module per algorithm family member, one registry per family.

Importing this package registers every algorithm (ring.py, tree.py, double_tree.py, butterfly.py,
rabenseifner.py, ps.py, shm.py, hier.py, hier_gather.py, alltoall.py, hier_alltoall.py,
native.py) with the registries in registry.py.
"""
from . import (alltoall, butterfly, double_tree, hier, hier_alltoall, hier_gather, native, ps,  # noqa: F401 (register)
               rabenseifner, ring, shm, tree)
from .api import (allgather, allreduce, allreduce_, allreduce_async, allreduce_async_, alltoall,  # noqa: F811
                  broadcast, broadcast_, reduce_scatter)
from .config import set_validation, set_verbose, settings
from .costmodel import calibrate
from .engine import Handle
from .errors import CollectiveError
from .registry import ALLGATHER, ALLREDUCE, ALLTOALL, BROADCAST, REDUCE_SCATTER

#: every allreduce algorithm name ("ps" also takes a server count: "ps:2")
ALLREDUCE_ALGORITHMS = ALLREDUCE.names()
#: every alltoall algorithm name
ALLTOALL_ALGORITHMS = ALLTOALL.names()

__all__ = ["allreduce", "allreduce_", "allreduce_async", "allreduce_async_", "broadcast", "broadcast_",
           "allgather", "reduce_scatter", "alltoall", "calibrate", "set_validation", "set_verbose", "settings",
           "Handle", "CollectiveError", "ALLREDUCE_ALGORITHMS", "ALLTOALL_ALGORITHMS", "ALLREDUCE", "ALLTOALL",
           "ALLGATHER", "BROADCAST", "REDUCE_SCATTER"]
