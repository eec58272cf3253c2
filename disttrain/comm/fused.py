"""Allreduces carried in the validation round (issue 16 item 4): one synchronisation per call
instead of two, in ONE compiled call.

On a communicator with node-local shared memory (node.py) the validation round can carry up to
node.SMALL bytes beside each rank's fingerprint. A fused allreduce of round k is, inside one numba
call (``_exchange``): copy x into this rank's slot of parity k % 2, write the header [ok=1, h]
(h = the call's signature hash xor its sequence number, validate.py), publish counter[r] = k, spin
until every peer's counter >= k, check that every header is [1, h], and fold the p slots in rank
order into the result - the same kernel on the same bytes, so every rank gets the same bits. If a
peer is late the kernel returns after a bounded spin and Python waits (validate.wait: yielding,
interruptible by a peer's failure notice), then ``_complete`` does the check and the fold. If any
header differs, nothing is folded: the slow path gathers readable descriptions and every rank
raises the same CollectiveError (validate._mismatch) - a fused call validates exactly as much as
the separate round did.

Memory model. Numba has no atomics, but aligned 8-byte loads and stores are single-copy atomic on
x86-64 (and AArch64), and the order is what matters. Under x86-TSO (Sewell et al. 2010, "x86-TSO:
a rigorous and usable programmer's model for x86 multiprocessors") stores become visible in
program order and loads are not reordered with older loads or younger stores; the one relaxation,
a store passing a later load (the store buffer), is harmless here because no rank reads what it
writes in the same round. So the writer's payload and header stores are visible before its
counter store, and a reader that saw counter >= k reads that round's payload. What the hardware
keeps, the compiler could still move: ``node._fence`` (LLVM ``fence seq_cst``: an ``mfence`` on
x86, ``dmb ish`` on ARM - where the hardware reorders more and the fence is needed) sits between
payload and counter and inside the spin loop, so neither the stores nor the re-loads are moved
or hoisted. The acknowledgement that a slot may be rewritten is the next round itself: a rank
writes parity k % 2 again at round k + 2, after every peer arrived at k + 1 - which a peer does
only after its fold of round k returned (its loads precede its later store under TSO, and the
fence orders them elsewhere).

Which calls fuse is a pure function of what the round agrees on (shape, dtype, op, algorithm) and
of the communicator (node state exists on all its ranks or on none): a rank whose call differs
posts a different fingerprint, so every rank sees the mismatch before anything is folded.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .. import stall
from . import node
from .kernels import _reduce_into, divide
from .node import _fence
from .ops import AVG, MAX, MIN, PROD, SUM
from .shm import fold

#: Largest payload that rides in the validation round with "auto". Above it, the p-fold read of
#: every slot by every rank (p n bytes read per rank, against shm's ~n) loses to the
#: reduce-scatter-style algorithms; measured with scripts/bench_call_overhead.py (README).
MAX_BYTES = 256 << 10
SPINS = 2000  # looks at the counters inside the compiled call before Python's yielding wait
_JIT = dict(nogil=True, cache=True, boundscheck=False)


def keyed(kop: int, acc) -> bool:
    """min/max over floats reduce order keys (api._run_reduce, kernels.to_keys)."""
    return kop in (MIN, MAX) and acc.kind == "f"


def eligible(nbytes: int, dtype, acc, kop, algorithm) -> bool:
    """Whether an allreduce of this signature is carried in its validation round (on a
    communicator with node state). min/max over floats are left to the algorithms (NaN and
    signed-zero semantics of the order keys, kernels.to_keys); float16 is reduced in float32."""
    return algorithm == "auto" and 0 < nbytes <= MAX_BYTES and acc is dtype and not keyed(kop, acc)


def payload(comm, x, acc, kop, algorithm):
    """The bytes a small "auto" allreduce carries in its validation round, or None (the general
    path, api._allreduce; the hot path calls ``_exchange`` directly)."""
    if not eligible(x.nbytes, x.dtype, acc, kop, algorithm) or node.get(comm) is None:
        return None
    return np.ascontiguousarray(x).reshape(-1).view(np.uint8)


def finish(comm, x, opc, kop, inplace):
    """Every rank's payload arrived with the validation round: each rank folds all p of them in
    rank order (the same kernel on the same bytes, so every rank gets the same bits)."""
    op_rec = stall.current()
    if op_rec is not None:
        op_rec.algorithm = "fused"
    rows = node.get(comm).payloads(x.nbytes).view(x.dtype)
    out = x if inplace and x.flags.c_contiguous else np.empty(x.shape, x.dtype)
    flat = out.reshape(-1)
    fold(rows, flat, kop)
    if opc == AVG:
        divide(flat, comm.Get_size())
    if inplace and out is not x:
        x[...] = out
        return x
    return out


# ------------------------------------------------------------------------ the compiled round
@njit(**_JIT)
def _arrived(ctrl, p, k, tries):
    for _ in range(tries):
        done = True
        for q in range(p):
            if ctrl[q * 8] < k:
                done = False
                break
        _fence()  # also a compiler barrier: the counters are loaded again on every look
        if done:
            return True
    return False


@njit(**_JIT)
def _complete(ctrl, slots, out, p, k, h, op):
    """After every rank arrived at round k: 1 and out = the rank-order fold of the p slots if
    every header is [1, h]; -1 (nothing folded) otherwise."""
    par = k & 1
    for q in range(p):
        b = p * 8 + (q * 2 + par) * 8
        if ctrl[b] != 1 or ctrl[b + 1] != h:
            return -1
    n = out.shape[0]
    for i in range(n):
        out[i] = slots[0, par, i]
    # q outside, i inside: the same left fold ((s0 op s1) op s2)... per element as shm.fold, but
    # each pass streams one slot (vectorised).
    for q in range(1, p):
        _reduce_into(out, slots[q, par], op)
    return 1


@njit(**_JIT)
def _exchange(ctrl, slots, x, out, r, p, k, h, op, tries):
    """Round k of a fused allreduce: publish x with header [1, h], wait up to `tries` looks for
    the peers, then check and fold (_complete). Returns 1 (done), -1 (headers differ), or 0 (a
    peer has not arrived yet: the caller waits, then calls _complete)."""
    par = k & 1
    mine = slots[r, par]
    for i in range(x.shape[0]):
        mine[i] = x[i]
    b = p * 8 + (r * 2 + par) * 8
    ctrl[b] = 1
    ctrl[b + 1] = h
    _fence()  # payload and header before the counter (TSO keeps store order; this keeps the compiler's)
    ctrl[r * 8] = k
    _fence()
    if not _arrived(ctrl, p, k, tries):
        return 0
    return _complete(ctrl, slots, out, p, k, h, op)


class Plan:
    """What the hot path needs about one call signature on one communicator, resolved once:
    the signature's hash (validate._hash), op codes, the typed slots. Never a decision that
    depends on anything the round does not agree on (see the module docstring)."""

    __slots__ = ("h", "opc", "kop", "avg", "slots", "dtype", "shape", "n")

    def __init__(self, st, h, x, opc, kop):
        self.h, self.opc, self.kop, self.avg = h, opc, kop, opc == AVG
        self.dtype, self.shape, self.n = x.dtype, x.shape, x.size
        self.slots = st.slots(x.dtype)


def warmup() -> None:
    """Compile (or load from numba's cache) the round for every reducing dtype."""
    p = 2
    ctrl = np.zeros(p * 24, np.int64)
    ctrl[:p * 8:8] = 1
    for t in (np.float32, np.float64, np.int32, np.int64):
        slots = np.zeros((p, 2, 4), t)
        x = np.ones(4, t)
        for op in (SUM, PROD, MIN, MAX):
            _exchange(ctrl, slots, x, np.empty(4, t), 0, p, 1, 0, op, 1)
            _complete(ctrl, slots, np.empty(4, t), p, 1, 0, op)
