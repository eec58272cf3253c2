"""algorithm="mpi": the MPI library's own collectives - the reference baseline and the oracle."""
from __future__ import annotations

import numpy as np

from .ops import mpi_op
from .registry import ALLGATHER, ALLREDUCE, ALLTOALL, BROADCAST, REDUCE_SCATTER

MPI = None  # bound on first use: importing mpi4py.MPI starts MPI, which `import disttrain` must not
_OPS: tuple = ()  # MPI.Op by op code


def _bind():
    global MPI, _OPS
    from mpi4py import MPI as _MPI

    _OPS = tuple(mpi_op(k) for k in range(5))
    MPI = _MPI


@ALLREDUCE.register("mpi")
def mpi_allreduce(comm, buf, op: int) -> None:
    if MPI is None:
        _bind()
    comm.Allreduce(MPI.IN_PLACE, buf, op=_OPS[op])


@REDUCE_SCATTER.register("mpi")
def mpi_reduce_scatter(comm, buf, op, counts, displs):
    out = np.empty(int(counts[comm.Get_rank()]), buf.dtype)
    comm.Reduce_scatter(buf, out, [int(c) for c in counts], op=mpi_op(op))
    return out


@ALLGATHER.register("mpi")
def mpi_allgather(comm, buf, counts, displs) -> None:
    if MPI is None:
        _bind()
    comm.Allgatherv(MPI.IN_PLACE, [buf, ([int(c) for c in counts], [int(d) for d in displs])])


@BROADCAST.register("mpi")
def mpi_broadcast(comm, buf, root: int) -> None:
    comm.Bcast(buf, root=root)


@ALLTOALL.register("mpi")
def mpi_alltoall(comm, send, scounts, sdispls):
    if MPI is None:
        _bind()
    rcounts = comm.alltoall(scounts)  # MPI_Alltoallv needs the receive counts up front
    rdispls = [0] * len(rcounts)
    for i in range(1, len(rcounts)):
        rdispls[i] = rdispls[i - 1] + rcounts[i - 1]
    recv = np.empty(sum(rcounts), np.uint8)
    comm.Alltoallv([send, (scounts, sdispls), MPI.BYTE], [recv, (rcounts, rdispls), MPI.BYTE])
    return recv, rcounts
