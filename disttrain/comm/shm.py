"""Shared-memory AllReduce for the ranks of one node (MPI-3 shared windows, node.py).

Point-to-point algorithms move every byte through the MPI library's shared-memory channel: the
sender copies it into a cell, the receiver copies it out, at every step. Ranks on one node can
instead read each other's memory: every rank copies its vector into its own segment of one
shared window, and after a flag round rank r reduces *its slice* of the vector across all p
segments (numba, nogil), writing it both into its segment and into its own result; after a
second round every rank copies the other p - 1 slices of the result straight out of their
owners' segments. Only rank r computes slice r, so every rank ends with the same bits. That is the
design of the node-local reductions in MPICH's and Open MPI's shared-memory collectives and of
NCCL's single-node "direct" algorithms (Graham & Shipman 2008, "MPI support for multi-core
architectures: optimized shared memory collectives"; Li, Hoefler & Snir 2013, "NUMA-aware
shared-memory collective communication for MPI").

Memory traffic per byte of payload, per rank: copy in (read 1, write 1), reduce its slice (read
p * 1/p = 1, write 2/p), copy out (read and write (p-1)/p): read 3 - 1/p, write 2 + 1/p; at p = 2
2.5 and 2.5. MPICH's large-message allreduce on one node (reduce-scatter + allgather, Thakur et
al. 2005) sends 2(p-1)/p of the vector through its shared-memory cells - each byte written into a
cell by the sender and copied out by the receiver - plus the local reductions into a temporary
and the copy of the input into the result: at p = 2 about read 4, write 3.5.

Vectors larger than the window (CHUNK_BYTES per rank and half) go through in chunks; the halves
alternate, so one flag round per step suffices (node.py). Small vectors (<= node.SMALL bytes) never
get here with validation on: "auto" carries them in the validation round itself (api.py).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from .. import stall
from ..errors import CollectiveError
from . import cost, node, validate
from .ops import MAX, MIN, PROD, SUM
from .p2p import partition
from .registry import ALLREDUCE

CHUNK_BYTES = 4 << 20  # per rank and half: the data window holds 2p of these
_JIT = dict(nogil=True, cache=True, boundscheck=False)


@njit(inline="always", **_JIT)
def _apply(a, b, op):
    """a (op) b; min/max keep a on ties (like kernels.reduce_into)."""
    if op == SUM:
        return a + b
    if op == PROD:
        return a * b
    if op == MIN:
        return b if b < a else a
    return b if b > a else a


@njit(**_JIT)
def _copy(dst, src):
    for i in range(src.shape[0]):
        dst[i] = src[i]


@njit(**_JIT)
def _reduce_slice(seg, lo, hi, r, out, op):
    """seg[r, lo:hi] = out[:] = seg[0, lo:hi] (op) seg[1, lo:hi] (op) ... in rank order."""
    p = seg.shape[0]
    for i in range(lo, hi):
        a = seg[0, i]
        for q in range(1, p):
            a = _apply(a, seg[q, i], op)
        seg[r, i] = a
        out[i - lo] = a


@njit(**_JIT)
def _gather(seg, displs, counts, r, out):
    """out[slice q] = seg[q, slice q] for every q != r."""
    for q in range(seg.shape[0]):
        if q != r:
            for i in range(displs[q], displs[q] + counts[q]):
                out[i] = seg[q, i]


def fold(rows: np.ndarray, out: np.ndarray, op: int) -> None:
    """out = rows[0] (op) rows[1] (op) ... (rank order): the small-message reduction of the
    payloads every rank read from the validation round. rows: [p, n] of one dtype."""
    if out.shape[0]:
        _fold(rows, out, op)


def fold_ref(rows: np.ndarray, op: int) -> np.ndarray:
    """NumPy reference for :func:`fold` (min/max keep the earlier rank's value on ties)."""
    out = rows[0].copy()
    for row in rows[1:]:
        out = {SUM: out + row, PROD: out * row, MIN: np.where(row < out, row, out),
               MAX: np.where(row > out, row, out)}[op].astype(rows.dtype)
    return out


@njit(**_JIT)
def _fold(rows, out, op):
    p = rows.shape[0]
    for i in range(out.shape[0]):
        a = rows[0, i]
        for q in range(1, p):
            a = _apply(a, rows[q, i], op)
        out[i] = a


def forget(*comms) -> None:
    """Release the shared state of communicators about to be freed (collective over each)."""
    node.forget(*comms)


#: Below this, "auto" leaves shm to the library (the formula says infinite; algorithm="shm" still
#: runs). Measured side by side (`launchers/local.sh 2|4 scripts/bench_call_overhead.py`, quiet
#: machine, columns "shm" and "mpi" against the library): shm 0.73x / 0.47x the library at
#: 1 / 4 MiB at P = 2 and 0.61x / 0.82x at P = 4, while our out-of-place library call ("mpi") was
#: 1.01x / 0.64x and 0.88x / 0.75x; from 16 MiB shm is 1.02-1.13x, at 64 MiB 1.65-1.88x. The
#: formula below counts bytes, not where they live: MPICH's small cells stay in cache while shm's
#: segments of several MiB do not, which the byte count cannot see - a measured threshold, like
#: MPICH's own size switches.
AUTO_MIN_BYTES = 16 << 20


def shm_cost(c, n: float) -> float:
    """Two flag rounds per chunk (a cache line each way, no software stack: alpha / 2 each) + the
    copy in and the copy out of p - 1 slices ((2p-1)/p n bytes copied once) + the reduction of this
    rank's slice over p segments ((p-1) n/p gamma); infinite across hosts. beta is the cost of a
    byte *sent* between ranks - through MPI's shared-memory channel that is two copies (into a
    cell and out of it) - so one copy in memory costs beta / 2 here."""
    if getattr(c, "hosts", 1) > 1 or n < AUTO_MIN_BYTES:
        return math.inf
    b, g = cost.bg(c, n)
    chunks = max(1, math.ceil(n / CHUNK_BYTES))
    return chunks * c.alpha + (2 * c.p - 1) / c.p * n * b / 2 + (c.p - 1) * n / c.p * g


@ALLREDUCE.register("shm", cost=shm_cost, overhead=10e-6)
def shm(comm, buf: np.ndarray, op: int) -> None:
    shm_into(comm, buf, buf, op)


@ALLREDUCE.out_of_place("shm")
def shm_into(comm, src: np.ndarray, dst: np.ndarray, op: int) -> None:
    """The shm allreduce of the 1-D `src` into the 1-D `dst` (the same array: in place)."""
    p, n = comm.Get_size(), src.shape[0]
    if p == 1 or n == 0:
        if dst is not src:
            dst[...] = src
        return
    st = node.prepare(comm)  # collective on first use: the algorithm choice is agreed
    if not st.single:
        raise CollectiveError(f"allreduce algorithm 'shm' needs every rank of the group on one node; this group "
                              f"of {p} spans several (this node has {st.node.Get_size()}): use 'auto' or a "
                              "point-to-point algorithm")
    r, item = st.r, src.itemsize
    per = max(1, min(n, CHUNK_BYTES // item))
    st.ensure(per * item)
    op_rec = stall.current()
    for o in range(0, n, per):
        m = min(per, n - o)
        seg = st.half(src.dtype)
        _copy(seg[r, :m], src[o:o + m])
        _round(st, comm, op_rec)  # every segment holds its rank's chunk
        counts, displs = _parts(m, p)
        lo, hi = int(displs[r]), int(displs[r] + counts[r])
        _reduce_slice(seg, lo, hi, r, dst[o + lo:o + hi], op)
        _round(st, comm, op_rec)  # every slice is reduced, in its owner's segment
        _gather(seg, displs, counts, r, dst[o:o + m])


_blocks: dict = {}  # (m, p) -> (counts, displs) int64 arrays (the kernels take arrays)


def _parts(m: int, p: int):
    key = (m, p)
    cd = _blocks.get(key)
    if cd is None:
        cd = partition(m, p)
        if len(_blocks) < 1024:
            _blocks[key] = cd
    return cd


def _round(st, comm, op_rec) -> None:
    k = st.arrive()
    if not st.done(k):
        validate.wait(st.request(k), comm, op_rec, "allreduce")


def warmup() -> None:
    """Compile (or load from numba's cache) the kernels for every reducing dtype."""
    for t in (np.float32, np.float64, np.int32, np.int64):
        a = np.ones((2, 4), t)
        _copy(a[0], a[1])
        for op in (SUM, PROD, MIN, MAX):
            _reduce_slice(a, 0, 2, 0, np.empty(2, t), op)
            fold(a, np.empty(4, t), op)
        _gather(a, np.array([0, 2], np.int64), np.array([2, 2], np.int64), 0, np.empty(4, t))
