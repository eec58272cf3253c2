"""Node-local shared memory of a communicator: one MPI-3 shared window per communicator whose
ranks all live on one node, and the flag rounds that synchronise them.

Layout of the control window (allocated once, MPI_Win_allocate_shared on the node communicator):

    counters  p x 64 B       rank r's round counter, alone on its cache line; only r writes it
    headers   p x 2 x 64 B   the validation fingerprint [ok, hash] per rank and round parity
    slots     p x 2 x SMALL  the payload of a fused allreduce (fused.py), per rank and round parity
                             (virtual memory: a page is only backed once a payload reaches it)

plus a data window (grown on demand, collective) holding two halves of p segments for
shm.py's large allreduce.

A *round* k (the k-th on this communicator; every rank counts the same rounds, since every rank
runs the same collectives in the same order) is the classic counter barrier: fence, store
counter[r] = k, wait until every counter >= k, fence. The fences are LLVM ``fence seq_cst``
emitted by numba, i.e. the memory barriers of MPI-4.0 sec. 12.7's unified model (what MPI_Win_sync
is): everything a rank wrote before arriving at round k is visible to every rank that has passed
round k. Data written for round k lives in the slot of parity k % 2: a rank rewrites that slot only
after passing round k + 1, which every peer reaches only after it has finished reading round k's
data - so one round per exchange suffices and no second barrier guards the slot.

Agreement: a communicator has this state on every rank or on none. It is created either right
after the communicator's first successful MPI-based validation check (every rank passed the same
check) or by the first 'shm' allreduce (an agreed algorithm choice) - never lazily at a point only
some ranks reach.
"""
from __future__ import annotations

import os

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from .. import mpi

SMALL = 1 << 20  # bytes of payload a fused validation round can carry (per rank and parity)


def touched_bytes(p: int) -> int:
    """Bytes of each slot faulted in when the node state is made: what a fused round can use on p
    ranks (fused.limit: all of SMALL at p = 2, a quarter from p = 3; tests/test_kernels.py holds
    the two together). Faulting all of SMALL kept p x 2 MiB of /dev/shm resident per communicator
    from its creation - with Docker's 64 MiB default, ~16 ranks' world and async communicators
    fill it, and a write past a full tmpfs is a SIGBUS (review5)."""
    return SMALL if p == 2 else SMALL >> 2

_LINE = 8  # int64 per cache line
_state: dict = {}  # communicator handle -> Node


@intrinsic
def _fence(typingctx):
    """A full memory barrier (LLVM ``fence seq_cst``): also a compiler barrier, so the spin loop's
    loads are re-done on every iteration."""
    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()
    return types.void(), codegen


_JIT = dict(nogil=True, cache=True, boundscheck=False)


@njit(**_JIT)
def _arrive(cnt, r, k):
    _fence()
    cnt[r * _LINE] = k
    _fence()


@njit(**_JIT)
def _spin(cnt, p, k, tries):
    """True once every rank's counter has reached round k (up to `tries` looks)."""
    for _ in range(tries):
        done = True
        for q in range(p):
            if cnt[q * _LINE] < k:
                done = False
                break
        _fence()
        if done:
            return True
    return False


# Public names of the round primitives for other shared-memory users (parallel/shared_buckets.py):
# one fence and one counter barrier for the whole library.
fence, arrive, spin = _fence, _arrive, _spin


@njit(**_JIT)
def _post(hdr, cnt, r, k, ok, h, slot, payload):
    """Write this rank's header (and payload) for round k, then arrive."""
    par = k & 1
    hdr[r, par, 0] = ok
    hdr[r, par, 1] = h
    for i in range(payload.shape[0]):
        slot[i] = payload[i]
    _arrive(cnt, r, k)


@njit(**_JIT)
def _agreed(hdr, p, k, h):
    par = k & 1
    for q in range(p):
        if hdr[q, par, 0] != 1 or hdr[q, par, 1] != h:
            return False
    return True


def warmup() -> None:
    """Load the round primitives' compiled code (numba's cache: ~2-5 ms each on first use - a
    rank loading _spin while its peers wait in their first round made it ~2.5 ms late)."""
    cnt = np.zeros(2 * _LINE, np.int64)
    hdr = np.zeros((2, 2, _LINE), np.int64)
    slot = np.zeros(8, np.uint8)
    _post(hdr, cnt, 0, 1, 1, 0, slot, slot[:0])
    _spin(cnt, 1, 1, 1)
    _agreed(hdr, 1, 1, 0)


class _Round:
    """Round k as a request: ``Test()`` looks at the counters a few times and, if a peer is still
    missing, yields the core (sched_yield: a peer waiting for a core gets it at once - what
    MPICH's progress throttle does; a no-op when the core is free). validate.wait's loop around
    it makes the wait interruptible and sleeps when ranks outnumber cores."""

    __slots__ = ("cnt", "p", "k")

    def __init__(self, cnt, p, k):
        self.cnt, self.p, self.k = cnt, p, k

    def Test(self) -> bool:  # noqa: N802 - the MPI request protocol validate.wait expects
        if _spin(self.cnt, self.p, self.k, 64):
            return True
        os.sched_yield()
        return False


class Node:
    """The shared control (and data) window of one single-node communicator."""

    def __init__(self, comm):
        MPI = mpi.MPI
        self.node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        self.p, self.r = comm.Get_size(), comm.Get_rank()
        self.single = self.node.Get_size() == self.p
        self.k = 0  # rounds passed on this communicator (the same count on every rank)
        self.win = self.data_win = self.mem = None
        self.cap = 0
        self.turn = 0  # which half of the data window the next chunk uses
        if not self.single:
            return
        p = self.p
        ctrl = p * 64 + p * 2 * 64 + p * 2 * SMALL
        self.win = MPI.Win.Allocate_shared(ctrl if self.r == 0 else 0, 1, comm=self.node)
        buf, _ = self.win.Shared_query(0)
        raw = np.frombuffer(buf, np.uint8)
        self.ctrl = raw[:p * 192].view(np.int64)  # counters then headers: what fused.py's kernels take
        self.cnt = raw[:p * 64].view(np.int64)
        self.hdr = raw[p * 64:p * 192].view(np.int64).reshape(p, 2, _LINE)
        self.small = raw[p * 192:].reshape(p, 2, SMALL)
        self.typed: dict = {}  # dtype -> [p, 2, SMALL / itemsize] view of the slots (fused.py)
        self.plans: dict = {}  # call signature -> fused.Plan (api.py's hot path), for settings `cfg`
        self.cfg = None
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self.cnt[self.r * _LINE] = 0  # MPI does not promise zeroed memory: each rank clears its own
        self.hdr[self.r] = 0
        # Fault the slots in now, not in the first call at each size (issue 16: a first call
        # paid ~1 us per fresh 4 KiB page, the writer's fault and every reader's): each rank
        # writes its own slots (the backing pages), then, after the barrier, touches a byte of
        # every page of its peers' (its page table entries).
        used = touched_bytes(p)
        self.small[self.r, :, :used] = 0
        self.win.Sync()
        self.node.Barrier()
        self.win.Sync()
        self.small[:, :, :used:4096].sum()

    # ------------------------------------------------------------------------------ rounds
    def arrive(self) -> int:
        """Arrive at the next round (everything written before is published); returns k."""
        self.k += 1
        _arrive(self.cnt, self.r, self.k)
        return self.k

    def done(self, k: int, tries: int = 500) -> bool:
        """Whether every rank has arrived at round k (a short spin; the caller's slow path is
        ``validate.wait(self.request(k), ...)``, interruptible and yielding)."""
        return _spin(self.cnt, self.p, k, tries)

    def request(self, k: int) -> _Round:
        return _Round(self.cnt, self.p, k)

    def post(self, h: int, ok: bool, payload=None) -> int:
        """Arrive at the next round with this rank's validation header [ok, h] and `payload` (a
        uint8 array of at most SMALL bytes, or None) published; returns the round."""
        self.k += 1
        k = self.k
        slot = self.small[self.r, k & 1]
        _post(self.hdr, self.cnt, self.r, k, 1 if ok else 0, h, slot, payload if payload is not None else slot[:0])
        return k

    def agreed(self, k: int, h: int) -> bool:
        """After round k: every rank was ok and posted the same h."""
        return _agreed(self.hdr, self.p, k, h)

    def payloads(self, nbytes: int) -> np.ndarray:
        """[p, nbytes] uint8: every rank's payload of the last exchange."""
        return self.small[:, self.k & 1, :nbytes]

    def slots(self, dtype) -> np.ndarray:
        """[p, 2, SMALL / itemsize] view of the payload slots in `dtype` (made once per dtype)."""
        v = self.typed.get(dtype)
        if v is None:
            v = self.typed[dtype] = self.small.view(dtype)
        return v

    # -------------------------------------------------------------------------- data window
    def ensure(self, nbytes: int) -> None:
        """A data window of at least `nbytes` per rank and half (collective over the node: the
        size comes from an agreed vector length)."""
        if nbytes <= self.cap:
            return
        MPI = mpi.MPI
        self.free_data()
        cap = -(-max(nbytes, 64 << 10) // 64) * 64
        self.data_win = MPI.Win.Allocate_shared(2 * self.p * cap if self.r == 0 else 0, 1, comm=self.node)
        buf, _ = self.data_win.Shared_query(0)
        self.mem = np.frombuffer(buf, np.uint8)
        self.cap = cap
        self.data_win.Lock_all(MPI.MODE_NOCHECK)

    def half(self, dtype) -> np.ndarray:
        """[p, cap / itemsize] view of the next half of the data window (alternating halves)."""
        h, self.turn = self.turn, self.turn ^ 1
        size = self.p * self.cap
        return self.mem[h * size:(h + 1) * size].view(dtype).reshape(self.p, -1)

    def free_data(self) -> None:
        if self.data_win is not None:
            self.data_win.Unlock_all()
            self.data_win.Free()
            self.data_win, self.mem, self.cap = None, None, 0

    def free(self) -> None:
        self.free_data()
        if self.win is not None:
            self.win.Unlock_all()
            self.win.Free()
            self.win = None
        self.node.Free()


def get(comm) -> Node | None:
    """The communicator's node state when it exists and the communicator is on one node."""
    st = _state.get(comm.handle)
    return st if st is not None and st.single else None


def prepare(comm) -> Node:
    """Create the communicator's node state (collective over `comm`; see the module docstring
    for where it may be called)."""
    st = _state.get(comm.handle)
    if st is None:
        st = _state[comm.handle] = Node(comm)
    return st


def known(comm) -> bool:
    return comm.handle in _state


def forget(*comms) -> None:
    """Release the shared state of communicators about to be freed (collective over each)."""
    for c in comms:
        st = _state.pop(c.handle, None)
        if st is not None:
            st.free()
