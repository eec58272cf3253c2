"""Building blocks shared by the point-to-point collective algorithms.

- ``partition``: np.array_split block boundaries (every algorithm splits data the same way).
- ``segments``: the pipeline segments of a block.
- ``scratch``: per-thread reusable receive buffers (no page faults on every call).
- ``fold`` / ``unfold``: the standard reduction of a non-power-of-two process count to the
  largest power of two below it (Thakur, Rabenseifner & Gropp 2005, sec. 4.1): in the first
  2*rem ranks, each even rank hands its vector to the odd rank above it and sits out; at the end
  the odd rank hands the result back.
"""
from __future__ import annotations

import threading
from functools import lru_cache

import numpy as np

from .kernels import reduce_into

# Message tags: each phase of each algorithm has its own, so a slow rank's late message from one
# phase can never be matched by a receive of another phase.
TAG_FOLD, TAG_UNFOLD, TAG_RS, TAG_AG, TAG_UP, TAG_DOWN, TAG_PS_PUSH, TAG_PS_PULL = range(100, 108)
TAG_BRUCK_SIZE, TAG_BRUCK_DATA, TAG_PAIRWISE, TAG_BCAST, TAG_XCHG = range(108, 113)


def partition(n: int, parts: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts, displs) of np.array_split(range(n), parts): the first n % parts blocks get one more."""
    q, r = divmod(n, parts)
    counts = np.full(parts, q, dtype=np.int64)
    counts[:r] += 1
    displs = np.zeros(parts, dtype=np.int64)
    np.cumsum(counts[:-1], out=displs[1:])
    return counts, displs


@lru_cache(maxsize=1024)
def blocks(n: int, parts: int) -> tuple[tuple, tuple]:
    """Cached :func:`partition` as tuples of Python ints (cheap to index on the hot path)."""
    counts, displs = partition(n, parts)
    return tuple(counts.tolist()), tuple(displs.tolist())


@lru_cache(maxsize=4096)
def segments(start: int, count: int, seg: int) -> tuple:
    """((offset, length), ...) pieces of at most `seg` elements covering [start, start+count)."""
    return tuple((start + o, min(seg, count - o)) for o in range(0, count, seg))


def seg_elems(buf: np.ndarray, seg_bytes: int) -> int:
    return max(1, seg_bytes // max(1, buf.itemsize))


_tls = threading.local()


def scratch(n: int, dtype, slot: int = 0) -> np.ndarray:
    """A reusable 1-D buffer of n elements for this thread (contents undefined).

    Buffers grow and are kept per (thread, slot), so the hot path does not allocate; a slot's
    buffer must not be held across another call with the same slot.
    """
    pool = getattr(_tls, "pool", None)
    if pool is None:
        pool = _tls.pool = {}
    nbytes = n * np.dtype(dtype).itemsize
    raw = pool.get(slot)
    if raw is None or raw.nbytes < nbytes:
        raw = pool[slot] = np.empty(max(nbytes, 64), dtype=np.uint8)
    return raw[:nbytes].view(dtype)


def waitall(reqs: list) -> None:
    if reqs:
        reqs[0].Waitall(reqs)
        reqs.clear()


# ------------------------------------------------------------------------ non-power-of-two fold
def pow2_below(p: int) -> int:
    return 1 << (p.bit_length() - 1)


def fold(comm, buf: np.ndarray, op: int) -> int:
    """Fold ranks beyond the largest power of two in; returns this rank's new rank or -1 if idle."""
    p, r = comm.Get_size(), comm.Get_rank()
    rem = p - pow2_below(p)
    if r >= 2 * rem:
        return r - rem
    if r % 2 == 0:
        comm.Send(buf, r + 1, TAG_FOLD)
        return -1
    tmp = scratch(buf.shape[0], buf.dtype, slot=1)
    comm.Recv(tmp, r - 1, TAG_FOLD)
    reduce_into(buf, tmp, op)
    return r // 2


def unfold(comm, buf: np.ndarray) -> None:
    """Hand the result back to the ranks that sat out in :func:`fold`."""
    p, r = comm.Get_size(), comm.Get_rank()
    rem = p - pow2_below(p)
    if r < 2 * rem:
        if r % 2 == 0:
            comm.Recv(buf, r + 1, TAG_UNFOLD)
        else:
            comm.Send(buf, r - 1, TAG_UNFOLD)


def pow2_allreduce(comm, buf: np.ndarray, op: int, body) -> None:
    """Run ``body(newrank, p2)`` - an allreduce among a power-of-two subset of ranks - wrapped in
    the fold/unfold that handles any other process count (and the trivial cases)."""
    p = comm.Get_size()
    if p == 1 or buf.shape[0] == 0:
        return
    newrank = fold(comm, buf, op)
    if newrank >= 0:
        body(newrank, pow2_below(p))
    unfold(comm, buf)


def real_rank(newrank: int, p: int) -> int:
    """Inverse of the fold's renumbering."""
    rem = p - pow2_below(p)
    return 2 * newrank + 1 if newrank < rem else newrank + rem
