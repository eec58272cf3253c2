"""disttrain - an MPI-native distributed training runtime (mpi4py + NumPy + Numba).

    import disttrain as dt
    dt.init()
    y = dt.allreduce(x, op="avg")

The public API (names and meanings fixed by DESIGN.md sec. 3) is re-exported here. MPI starts on
``dt.init()`` (or on the first collective), not at import.
"""
from .comm import (ALLREDUCE_ALGORITHMS, ALLTOALL_ALGORITHMS, CollectiveError, Handle, allgather, allreduce,
                   allreduce_, allreduce_async, allreduce_async_, alltoall, broadcast, broadcast_, calibrate,
                   reduce_scatter, set_validation, set_verbose)
from .parallel import DataParallel, Mesh, Pipeline, broadcast_optimizer_state, broadcast_parameters, check_replicas
from . import timeline
from .flight import dump_flight_record
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .nn.gradcheck import gradcheck
from .stall import set_stall_timeout
from .runtime import Group, init, install_early_abort_hook, local_rank, local_size, new_group, rank, size, world

__version__ = "0.1.0"

__all__ = ["init", "rank", "size", "local_rank", "local_size", "world", "new_group", "Group",
           "allreduce", "allreduce_", "allreduce_async", "allreduce_async_", "broadcast", "broadcast_",
           "allgather", "reduce_scatter", "alltoall", "calibrate", "set_validation", "set_verbose",
           "Handle", "CollectiveError", "ALLREDUCE_ALGORITHMS", "ALLTOALL_ALGORITHMS",
           "DataParallel", "Mesh", "Pipeline", "broadcast_parameters", "broadcast_optimizer_state", "check_replicas", "timeline", "set_stall_timeout",
           "dump_flight_record", "gradcheck", "save_checkpoint", "load_checkpoint", "CheckpointError"]

install_early_abort_hook()  # an exception before dt.init() ends the whole job, not only this rank
