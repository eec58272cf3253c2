"""Shared-memory AllReduce for the ranks of one node (MPI-3 shared windows).

Point-to-point algorithms move every byte through the MPI library's shared-memory channel: a ring
copies each byte into a cell and out again 2(p-1)/p times over, in 2(p-1) dependent steps. Ranks
on one node can instead read each other's memory: every rank copies its vector into its own segment
of one shared window, and after a barrier rank r reduces *its slice* of the vector across all p
segments in place (numba, nogil) - then, after a second barrier, every rank copies the whole
result out, slice q from segment q. Per byte of payload each rank writes 1 + 1/p and reads 1 + 1
(its slices of the p segments, then the result) - two barriers per chunk whatever p is (the
window has two halves used alternately, so no third barrier guards the next chunk's copy-in). That is the design of
the node-local reductions in MPICH's and Open MPI's shared-memory collectives and of NCCL's
single-node "direct" algorithms (Graham & Shipman 2008, "MPI support for multi-core
architectures: optimized shared memory collectives"; Li, Hoefler & Snir 2013 "NUMA-aware
shared-memory collective communication for MPI").

Only rank r computes slice r, so every rank ends with the same bits. Vectors larger than the
window's capacity (CHUNK_BYTES per rank) go through in chunks. Synchronisation follows the MPI-3
shared-memory model (MPI-4.0 sec. 12.7, "unified" model): a passive-target epoch opened once
(``Lock_all``), then ``Win.Sync`` (a memory barrier) on both sides of every ``Barrier``.

The node communicator and window of a communicator are created on its first shm call (collective:
the algorithm choice is agreed, so every rank calls it) and released with the group. A
communicator spanning several nodes cannot use this algorithm: every rank sees that (the node sizes
differ from the group size) and raises the same CollectiveError; ``auto`` never picks it there (its
cost is infinite for more than one host).
"""
from __future__ import annotations

import math

import numpy as np

from .. import mpi
from ..errors import CollectiveError
from . import cost
from .kernels import reduce_into
from .p2p import blocks
from .registry import ALLREDUCE

CHUNK_BYTES = 4 << 20  # per rank and half: the window holds 2p of these
_state: dict = {}  # communicator handle -> _Node


class _Node:
    """A communicator's node-local communicator and shared window (grown on demand)."""

    def __init__(self, comm):
        MPI = mpi.MPI
        self.node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        self.single = self.node.Get_size() == comm.Get_size()
        self.win, self.mem, self.cap = None, None, 0
        self.turn = 0  # which half of the window the next chunk uses (the same count on every rank)

    def ensure(self, nbytes: int) -> None:
        """A window of at least `nbytes` per rank (collective over the node: every rank asks for
        the same size, since the vector length is the same on every rank)."""
        if nbytes <= self.cap:
            return
        MPI = mpi.MPI
        self.free_window()
        p = self.node.Get_size()
        cap = max(nbytes, 64 << 10)
        # one allocation on node rank 0 holding two sets of segments (see segments()): contiguous,
        # so segment q of half h starts at (h * p + q) * cap
        self.win = MPI.Win.Allocate_shared(2 * p * cap if self.node.Get_rank() == 0 else 0, 1, comm=self.node)
        buf, _ = self.win.Shared_query(0)
        self.mem = np.frombuffer(buf, np.uint8)
        self.cap = cap
        self.win.Lock_all(MPI.MODE_NOCHECK)

    def segments(self, count: int, dtype) -> list:
        """The p segments for the next chunk, alternating between the window's two halves: a rank
        may copy its next chunk in while a slower peer still copies the previous result out of the
        other half, and cannot get two chunks ahead (it would first have to pass a fence the slow
        peer has not reached) - so one fence per chunk suffices there."""
        p, h = self.node.Get_size(), self.turn
        self.turn ^= 1
        return [self.mem[(h * p + q) * self.cap:][:count * np.dtype(dtype).itemsize].view(dtype) for q in range(p)]

    def fence(self) -> None:
        """Everything written before by any rank is visible to every rank after."""
        self.win.Sync()
        self.node.Barrier()
        self.win.Sync()

    def free_window(self) -> None:
        if self.win is not None:
            self.win.Unlock_all()
            self.win.Free()
            self.win, self.mem, self.cap = None, None, 0

    def free(self) -> None:
        self.free_window()
        self.node.Free()


def _node_of(comm) -> _Node:
    st = _state.get(comm.handle)
    if st is None:
        st = _state[comm.handle] = _Node(comm)
    return st


def forget(*comms) -> None:
    """Release the shared state of communicators about to be freed (collective over each)."""
    for c in comms:
        st = _state.pop(c.handle, None)
        if st is not None:
            st.free()


def shm_cost(c, n: float) -> float:
    """Two barriers (about 2 lg p latencies each) + copy in and out (2 n beta, within the node) +
    the reduction of this rank's slice over p segments ((p-1) n/p gamma); infinite across hosts."""
    if getattr(c, "hosts", 1) > 1:
        return math.inf
    b, g = cost.bg(c, n)
    chunks = max(1, math.ceil(n / CHUNK_BYTES))
    return chunks * 4 * math.ceil(math.log2(max(2, c.p))) * c.alpha + 2 * n * b + (c.p - 1) * n / c.p * g


@ALLREDUCE.register("shm", cost=shm_cost, overhead=20e-6)
def shm(comm, buf: np.ndarray, op: int) -> None:
    p, n = comm.Get_size(), buf.shape[0]
    if p == 1 or n == 0:
        return
    st = _node_of(comm)
    if not st.single:
        raise CollectiveError(f"allreduce algorithm 'shm' needs every rank of the group on one node; this group "
                              f"of {p} spans several (this node has {st.node.Get_size()}): use 'auto' or a "
                              "point-to-point algorithm")
    r, item = st.node.Get_rank(), buf.itemsize
    per = max(1, min(n, CHUNK_BYTES // item))
    st.ensure(per * item)
    for o in range(0, n, per):
        m = min(per, n - o)
        seg = st.segments(m, buf.dtype)
        seg[r][:] = buf[o:o + m]
        st.fence()  # every segment holds its rank's chunk
        counts, displs = blocks(m, p)
        lo, hi = displs[r], displs[r] + counts[r]
        mine = seg[r][lo:hi]
        for q in range(p):
            if q != r:
                reduce_into(mine, seg[q][lo:hi], op)
        st.fence()  # every slice is reduced, in its owner's segment
        for q in range(p):
            a, b = displs[q], displs[q] + counts[q]
            buf[o + a:o + b] = seg[q][a:b]
