"""algorithm="mpi": the MPI library's own collectives - the reference baseline and the oracle."""
from __future__ import annotations

import math

import numpy as np

from .. import mpi
from .butterfly import butterfly_cost
from .ops import mpi_op
from .rabenseifner import rabenseifner_cost
from .registry import ALLGATHER, ALLREDUCE, ALLTOALL, BROADCAST, REDUCE_SCATTER

_OPS: tuple = ()  # MPI.Op by op code, looked up once


def _op(op: int):
    global _OPS
    if not _OPS:
        _OPS = tuple(mpi_op(k) for k in range(5))
    return _OPS[op]


def native_cost(c, n: float) -> float:
    """No formula: MPICH switches among internal algorithms by size, so an honest one cannot be
    written. calibrate() measures the library from 8 B to 64 MiB; this interpolates that table in
    log-log (linear extrapolation beyond it). Uncalibrated, the library is assumed to match our
    best latency algorithm, minus the Python overhead."""
    if not c.native:
        return min(butterfly_cost(c, n), rabenseifner_cost(c, n))
    xs = np.log([max(b, 1) for b, _ in c.native])
    ys = np.log([t for _, t in c.native])
    x = math.log(max(n, 1))
    if x <= xs[0]:
        return float(math.exp(ys[0]))
    if x >= xs[-1]:
        return float(c.native[-1][1] * n / c.native[-1][0])
    return float(math.exp(np.interp(x, xs, ys)))


@ALLREDUCE.register("mpi", cost=native_cost, overhead=1.5e-6)
def mpi_allreduce(comm, buf, op: int) -> None:
    comm.Allreduce(mpi.MPI.IN_PLACE, buf, op=_op(op))


@ALLREDUCE.out_of_place("mpi")
def mpi_allreduce_into(comm, src, dst, op: int) -> None:
    comm.Allreduce(src, dst, op=_op(op))  # MPI_Allreduce(x, y): no copy of x first


@REDUCE_SCATTER.register("mpi")
def mpi_reduce_scatter(comm, buf, op, counts, displs):
    out = np.empty(int(counts[comm.Get_rank()]), buf.dtype)
    comm.Reduce_scatter(buf, out, [int(c) for c in counts], op=mpi_op(op))
    return out


@ALLGATHER.register("mpi")
def mpi_allgather(comm, buf, counts, displs) -> None:
    comm.Allgatherv(mpi.MPI.IN_PLACE, [buf, ([int(c) for c in counts], [int(d) for d in displs])])


@BROADCAST.register("mpi")
def mpi_broadcast(comm, buf, root: int) -> None:
    comm.Bcast(buf, root=root)


@ALLTOALL.register("mpi")
def mpi_alltoall(comm, send, scounts, sdispls):
    rcounts = comm.alltoall(scounts)  # MPI_Alltoallv needs the receive counts up front
    rdispls = [0] * len(rcounts)
    for i in range(1, len(rcounts)):
        rdispls[i] = rdispls[i - 1] + rcounts[i - 1]
    recv = np.empty(sum(rcounts), np.uint8)
    comm.Alltoallv([send, (scounts, sdispls), mpi.MPI.BYTE], [recv, (rcounts, rdispls), mpi.MPI.BYTE])
    return recv, rcounts
