"""Gradient buckets in the node's shared memory: the gradient allreduce copies nothing (issue 16).

When every rank of a DataParallel group lives on one node, each rank's gradient buckets are its
row of one MPI-3 shared window (``MPI_Win_allocate_shared``): layers accumulate their ``.grad``
straight into shared memory. A bucket's average is then two counter rounds and one pass over the
memory (the direct single-node reduction of MPICH's / Open MPI's shared-memory collectives and of
NCCL's one-node algorithms; Graham & Shipman 2008, Li, Hoefler & Snir 2013):

1. round: every rank has finished its bucket (it arrives only after its own backward filled it);
   DataParallel's validation check of the bucket comes right after it (so the check finds every
   peer there and a failed check fails on every rank after the same rounds);
2. rank r reduces *its slice* (``np.array_split`` part r) of the bucket over the p rows in rank
   order, divides by p, and writes the result into that slice of *every* row (numba, nogil) -
   half the reduction per core at p = 2, each element computed by exactly one rank, so every rank
   holds the same bits (the same bits as the "shm" algorithm followed by the average's division);
3. round: every slice is written; each rank's row holds the average, in its own ``.grad`` views.

Memory traffic per byte of payload, per rank: read 1, write 1 (p slices of n/p read and written)
- against read 3 - 1/p, write 2 + 1/p for the copy-in / copy-out "shm" algorithm, and about read 4,
write 3.5 for MPICH's reduce-scatter + allgather at p = 2 (comm/shm.py's docstring). No MPI call
on the hot path: the rounds are node.py's counter barrier (fence, store, spin) on counters of
this window, waited for through ``validate.wait`` (interruptible by a peer's failure or departure).
A waiting rank spins briefly, then sleeps on the late peer's counter (a futex, comm/futex.py)
until that peer stores it and wakes it, looking again at least every _NAP: the wait is for a peer
still in its backward pass, and on a busy node a spinning thread would take the core that peer's
GEMM needs. Sleeping in fixed 20 us steps instead (the previous version) woke the communication
thread 15-24 times per step on the core its own rank's GEMM runs on; the futex, about 4-7 times.

Why no double buffering: a peer writes into this rank's row only between rounds 1 and 2 of a
bucket, and this rank touches that bucket again (zero_grad, the next backward) only after round 2.

Agreement: DataParallel uses shared buckets only when every input of :func:`wanted` (sizes,
dtype, algorithm, compression, shard mode - all in its construction check - and the group's
agreed topology) says so, and which window a DataParallel gets is agreed by one allreduce at
construction (:func:`take`).

Windows are kept per group (by its uid) and reused by a later DataParallel once no array of an
earlier one is alive on any rank; ``Group.free`` unmaps those no rank uses any more
(parallel/windows.py; one still used somewhere stays until the process exits), the world's go at
exit.
"""
from __future__ import annotations

import os
import weakref

import numpy as np
from numba import njit

from .. import mpi, stall
from ..comm import futex
from ..comm import node as N
from ..comm import topology, validate
from ..comm.p2p import blocks
from ..groups import local_size, on_free
from . import windows

_LINE = 64  # bytes: each rank's round counter alone on a cache line
_BLOCK = 1024  # elements per pass of the reduction kernel (accumulator stays in L1)
_SPINS = 2000  # counter looks before a waiting rank starts sleeping (~tens of us)
_NAP = 1e-3  # seconds a waiting rank sleeps at most before it looks again (futex.wait's timeout)
_windows: dict = {}  # group uid -> [Window], in creation order (the same list on every rank)


def wanted(group, shard: str, compressor, algorithm: str, dtype) -> bool:
    """Whether a DataParallel with these (agreed) settings keeps its buckets in shared memory:
    a group of >= 2 ranks on one node (real nodes: DISTTRAIN_FAKE_NODES emulates several and
    turns this off), plain averaging ("auto", no compression, no sharding), float32 or float64."""
    if group.size < 2 or shard != "none" or compressor.name != "none" or algorithm != "auto":
        return False
    if np.dtype(dtype) not in (np.float32, np.float64):
        return False
    t = topology.of(group.comm)
    return t is not None and t.nodes == 1


def spare_core() -> bool:
    """Whether every rank on this host has a core for its communication thread besides the one
    its training thread computes on: the cores this process may run on are at least twice the
    host's ranks. Without one, a bucket averaged during backward only time-slices with the GEMMs
    (and the two threads' scheduling adds waits), so DataParallel averages every shared bucket on
    the caller after backward instead (measured side by side: README, ARCHITECTURE sec. 11).
    A per-process answer (CPU affinity): SharedBuckets agrees on it over the group."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return cores >= 2 * local_size()


@njit(nogil=True, cache=True, boundscheck=False)
def _average_slice(rows, lo, hi, d, acc):
    """rows[:, lo:hi] = (rows[0] + rows[1] + ... + rows[p-1]) / d, summed in rank order; blockwise
    over 1-D row slices, so that every inner loop is a plain vectorised loop and the accumulator
    stays in L1 (indexing rows[q, i] in the inner loops instead measured 8x slower: not vectorised)."""
    p = rows.shape[0]
    b = acc.shape[0]
    for s in range(lo, hi, b):
        m = min(b, hi - s)
        src = rows[0, s:s + m]
        for i in range(m):
            acc[i] = src[i]
        for q in range(1, p):
            src = rows[q, s:s + m]
            for i in range(m):
                acc[i] += src[i]
        for i in range(m):
            acc[i] = acc[i] / d
        for q in range(p):
            dst = rows[q, s:s + m]
            for i in range(m):
                dst[i] = acc[i]


def average_slice_ref(rows: np.ndarray, lo: int, hi: int, d: int) -> None:
    """NumPy reference for the kernel (same order of additions, same division)."""
    acc = rows[0, lo:hi].copy()
    for q in range(1, rows.shape[0]):
        acc += rows[q, lo:hi]
    rows[:, lo:hi] = acc / rows.dtype.type(d)


@njit(nogil=True, cache=True, boundscheck=False)
def _late(cnt, p, k):
    """The first rank whose counter has not reached round k, or -1."""
    N.fence()
    for q in range(p):
        if cnt[q * (_LINE // 8)] < k:
            return q
    return -1


class _Round:
    """Round k of a window as a request for ``validate.wait``: a burst of looks, then a sleep on
    the first late rank's counter until that rank stores it (futex.py) or _NAP passes."""

    __slots__ = ("cnt", "p", "k")

    def __init__(self, cnt, p, k):
        self.cnt, self.p, self.k = cnt, p, k

    def Test(self) -> bool:  # noqa: N802 - the MPI request protocol validate.wait expects
        if N.spin(self.cnt, self.p, self.k, 64):
            return True
        q = _late(self.cnt, self.p, self.k)
        if q < 0:
            return True
        i = q * (_LINE // 8)
        seen = int(self.cnt[i])
        if seen >= self.k:  # it arrived since _late looked (its wake may have come before our wait):
            return False    # look again - not done, a later rank may still be missing
        futex.wait(self.cnt.ctypes.data + i * 8, seen, _NAP)
        return False


class Window:
    """One shared window on a single-node communicator: p rows of `n` elements of `dtype` (rank
    r's buckets are row r) and a round counter per rank."""

    def __init__(self, comm, n: int, dtype):
        MPI = mpi.MPI
        self.p, self.r, self.dtype = comm.Get_size(), comm.Get_rank(), np.dtype(dtype)
        self.n = n
        row = -(-max(n, 1) * self.dtype.itemsize // _LINE) * _LINE
        # One allocation by rank 0 (one contiguous [p, row] array); each rank first touches its
        # own row below, so its pages sit in its own memory (NUMA).
        self.win = MPI.Win.Allocate_shared(self.p * (_LINE + row) if self.r == 0 else 0, 1, comm=comm)
        self.buf, _ = self.win.Shared_query(0)
        self.row_bytes = row
        raw = np.frombuffer(self.buf, np.uint8)
        self.cnt = raw[:self.p * _LINE].view(np.int64)
        self.rows = raw[self.p * _LINE:].view(self.dtype).reshape(self.p, -1)
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self._mine = self.cnt.ctypes.data + self.r * _LINE  # this rank's counter, for futex.wake
        self.cnt[self.r * (_LINE // 8)] = 0  # MPI does not promise zeroed memory: each rank clears its own
        self.rows[self.r] = 0
        self.win.Sync()
        comm.Barrier()
        self.win.Sync()
        self.k = 0  # rounds passed (the same on every rank: every rank reduces the same buckets in order)
        self.acc = np.empty(_BLOCK, self.dtype)
        self._user = None  # weakref to the row handed out: the window is free again once it is dead

    def free_for(self, n: int, dtype) -> bool:
        """Whether no array handed out from this window is alive here and it fits n x dtype."""
        return (self._user is None or self._user() is None) and n <= self.n and np.dtype(dtype) == self.dtype

    def row(self) -> np.ndarray:
        """This rank's row (its buckets, back to back); the window is in use while it or any view
        of it lives."""
        # a fresh array over the buffer: every view handed out has it as its .base, so the weak
        # reference dies exactly when the last of them does
        fresh = np.frombuffer(self.buf, np.uint8)
        start = self.p * _LINE + self.r * self.row_bytes
        self._user = weakref.ref(fresh)
        return fresh[start:start + self.n * self.dtype.itemsize].view(self.dtype)

    def ready(self, comm, kind: str) -> None:
        """Round: every rank's bucket is complete (collective; before :meth:`average`)."""
        self._round(comm, kind)

    def average(self, off: int, size: int, comm, kind: str) -> None:
        """After :meth:`ready`: average elements [off, off + size) of the rows over the ranks, in
        place in every row (collective: every rank calls it for the same buckets in the same order)."""
        counts, displs = blocks(size, self.p)
        lo = off + displs[self.r]
        if counts[self.r]:
            _average_slice(self.rows, lo, lo + counts[self.r], self.dtype.type(self.p), self.acc)
        self._round(comm, kind)  # every slice is in every row

    def _round(self, comm, kind: str) -> None:
        self.k += 1
        N.arrive(self.cnt, self.r, self.k)
        futex.wake(self._mine)  # peers asleep on this counter (one system call, ~1 us)
        if not N.spin(self.cnt, self.p, self.k, _SPINS):
            validate.wait(_Round(self.cnt, self.p, self.k), comm, stall.current(), kind)

    def free(self) -> None:
        self.win.Unlock_all()
        self.win.Free()


def take(group, n: int, dtype) -> Window:
    """A window of >= n elements of `dtype` for a new DataParallel on `group` (collective over the
    group's blocking communicator): the first of the group's windows that is free on every rank,
    else a new one. Windows free everywhere but too small are released."""
    MPI = mpi.MPI
    comm = group.comm
    pool = _windows.setdefault(group.uid, [])
    fits = np.array([w.free_for(n, dtype) for w in pool] + [w.free_for(0, w.dtype) for w in pool], np.int32)
    comm.Allreduce(MPI.IN_PLACE, fits, op=MPI.MIN)  # per-rank liveness (garbage collection) agreed
    k = len(pool)
    chosen = next((i for i in range(k) if fits[i]), None)
    keep = []
    for i, w in enumerate(pool):
        if i != chosen and fits[k + i]:
            w.free()  # free on every rank, nothing of it alive anywhere
        else:
            keep.append(w)
    if chosen is None:
        w = Window(comm, n, dtype)
        keep.append(w)
    else:
        w = pool[chosen]
    _windows[group.uid] = keep
    return w


def _give_back(group) -> None:
    """Group.free: the group's windows no array of any rank is alive in are unmapped."""
    windows.give_back(group, _windows.pop(group.uid, []), lambda w: w.free_for(0, w.dtype), Window.free)


on_free(_give_back)


class SharedBuckets:
    """A DataParallel's buckets, each a slice of this rank's row of a shared window.

    Args:
        group: the DataParallel's group (one node, >= 2 ranks: see :func:`wanted`).
        buckets: its buckets; their ``buffer`` is replaced by the shared slice (values kept).
    """

    def __init__(self, group, buckets):
        # Average during backward (else all on the caller after it) - agreed, as the ranks' CPU
        # affinities may differ: with a rank averaging during backward and another after it, the
        # buckets and a user's own async collectives reach the two communication threads' queues in
        # different orders, and each waits for the other (review5).
        self.overlap = bool(group.comm.allreduce(int(spare_core()), op=mpi.MPI.MIN))
        sizes = [b.size for b in buckets]
        self.window = take(group, sum(sizes), buckets[0].buffer.dtype)
        row = self.window.row()
        self.offsets = {}
        off = 0
        for b, n in zip(buckets, sizes):
            view = row[off:off + n]
            view[...] = b.buffer
            b.buffer = view
            self.offsets[b.index] = off
            off += n

    def ready(self, comm) -> None:
        """Wait until every rank's next bucket is complete (the first round of its average). The
        caller's validation check goes after it: by then every peer has arrived, so the check's
        own wait (a spinning one) is short, and this wait sleeps instead (module docstring)."""
        self.window.ready(comm, "DataParallel bucket")

    def average(self, bucket, comm) -> np.ndarray:
        """After :meth:`ready`: the bucket's average over the group, in place (on the
        communication thread, or inline)."""
        self.window.average(self.offsets[bucket.index], bucket.size, comm, "DataParallel bucket")
        return bucket.buffer

    def sent_bytes(self, bucket) -> int:
        """Bytes this rank writes into its peers' rows for one bucket: its slice, p - 1 times."""
        counts, _ = blocks(bucket.size, self.window.p)
        return counts[self.window.r] * (self.window.p - 1) * bucket.buffer.itemsize


def warmup() -> None:
    """Compile (or load from numba's cache) the kernels: the average for both float dtypes, and
    the late-rank scan of a waiting round."""
    for t in (np.float32, np.float64):
        _average_slice(np.ones((2, 4), t), 0, 4, t(2), np.empty(2, t))
    _late(np.zeros(_LINE // 8, np.int64), 1, 0)
