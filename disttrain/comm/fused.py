"""Allreduces carried in the validation round and, past one chunk, the rounds after it (issue 16
item 4): one synchronisation per chunk, the first one the validation round, in ONE compiled call.

On a communicator with node-local shared memory (node.py) the validation round can carry up to
node.SMALL bytes beside each rank's fingerprint. A fused allreduce of round k is, inside one numba
call (``_exchange``): copy x into this rank's slot of parity k % 2, write the header [ok=1, h]
(h = the call's signature hash xor its sequence number, validate.py), publish counter[r] = k, spin
until every peer's counter >= k, check that every header is [1, h], and fold the p slots in rank
order into the result - the same kernel on the same bytes, so every rank gets the same bits. A
payload larger than one chunk (chunk(): CHUNK_BYTES) takes rounds k, k + 1, ... in the same call,
chunk c in round k + c and the slot of its parity - the argument below holds round by round. If a
peer is late the kernel returns after a bounded spin and Python waits (validate.wait: yielding,
interruptible by a peer's failure notice), then calls it again from that round on. If any
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
from . import node, validate
from .kernels import _reduce_into, divide
from .node import _fence
from .ops import AVG, MAX, MIN, PROD, SUM
from .shm import fold

#: Largest payload a fused allreduce carries with "auto" from p = 5 (not measured above it: every
#: rank reads all p slots - (p + 1) n bytes per rank - which grows with p; call4 measured the
#: one-round form at P = 4 0.82x the library at 512 KiB, 0.73x at 1 MiB).
MAX_BYTES = 256 << 10
#: The same for p = 2, 3, 4, measured side by side against the library and against the
#: delegated call (validation round + MPI_Allreduce(x, y)) - branch call5, exclusive lock,
#: `launchers/local.sh P scripts/bench_call_overhead.py` with the limit raised to 16 MiB, one run
#: each: P = 2 1 MiB fused 0.95-1.00x the library vs delegated 0.91-0.95x (2 runs); P = 3
#: 1.16-1.61x from 512 KiB to 16 MiB vs 0.65-0.86x; P = 4 1.07 / 0.90 / 0.88 / 0.49x at 512 KiB /
#: 1 / 4 / 16 MiB vs 0.69 / 0.71 / 0.89 / 0.81x. 16 MiB is left to `auto`'s choice (shm).
LIMITS = {2: 1 << 20, 3: 4 << 20, 4: 4 << 20}
#: Bytes per round of a larger fused allreduce (chunk()): the chunks stream through the slots.
CHUNK_BYTES = 256 << 10
SPINS = 2000  # looks at the counters inside the compiled call before Python's yielding wait
_JIT = dict(nogil=True, cache=True, boundscheck=False)


def keyed(kop: int, acc) -> bool:
    """min/max over floats reduce order keys (api._run_reduce, kernels.to_keys)."""
    return kop in (MIN, MAX) and acc.kind == "f"


def limit(p: int) -> int:
    """Largest payload that rides in the validation round with "auto" on p ranks (a pure function
    of the agreed group size)."""
    return LIMITS.get(p, MAX_BYTES)


def chunk(p: int, itemsize: int) -> int:
    """Elements per round of a fused allreduce on p ranks: CHUNK_BYTES, within the part of each
    slot the node state faulted in (node.touched_bytes) - a pure function of agreed values."""
    return min(CHUNK_BYTES, node.touched_bytes(p)) // itemsize


def fuses(dtype, acc, kop, algorithm) -> bool:
    """Whether allreduces of this signature (any size) may be carried in the validation round:
    "auto" only; min/max over floats are left to the algorithms (NaN and signed-zero semantics of
    the order keys, kernels.to_keys); float16 is reduced in float32."""
    # ==, not `is`: an unpickled dtype (mpi4py's bcast, a pickled data set) equals np.float32 but is
    # another object - by identity that rank left the fused round its peers took (a hang, and their
    # fold read its stale slot: review5)
    return algorithm == "auto" and acc == dtype and not keyed(kop, acc)


def eligible(nbytes: int, dtype, acc, kop, algorithm, p: int) -> bool:
    """Whether an allreduce of this signature and size is carried in its validation round on p
    ranks (on a communicator with node state)."""
    return 0 < nbytes <= limit(p) and fuses(dtype, acc, kop, algorithm)


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
    if p == 1:
        for i in range(n):
            out[i] = slots[0, par, i]
        return 1
    # The first pass folds two slots at once (out is written once, not copied then re-read);
    # q outside, i inside: the same left fold ((s0 op s1) op s2)... per element as shm.fold,
    # each pass streaming one more slot (vectorised).
    _fold2(out, slots[0, par], slots[1, par], op)
    for q in range(2, p):
        _reduce_into(out, slots[q, par], op)
    return 1


@njit(**_JIT)
def _fold2(out, a, b, op):
    """out = a (op) b (min/max keep a on ties, like kernels.reduce_into)."""
    n = out.shape[0]
    if op == SUM:
        for i in range(n):
            out[i] = a[i] + b[i]
    elif op == PROD:
        for i in range(n):
            out[i] = a[i] * b[i]
    elif op == MIN:
        for i in range(n):
            out[i] = b[i] if b[i] < a[i] else a[i]
    else:
        for i in range(n):
            out[i] = b[i] if b[i] > a[i] else a[i]


@njit(**_JIT)
def _exchange(ctrl, slots, x, out, r, p, k, h, op, tries, posted, chunk, c):
    """Rounds k + c, k + c + 1, ... of a fused allreduce, one per `chunk` elements of x (round
    k + c carries elements [c chunk, (c + 1) chunk)): publish the chunk with header [1, h]
    (unless `posted`: an earlier call arrived at this round already), wait up to `tries` looks
    for the peers, check every header and fold the chunk (_complete) into out[c chunk:]. Returns
    DONE (0), LATE + c (a peer has not arrived at round k + c yet: the caller waits, then calls
    again from chunk c with posted=True) or MISMATCH - c (headers differ at round k + c: nothing
    of that round folded) - the chunk in the code, not in an array the caller would have to pass
    and reset (one argument fewer to unbox per call: issue 16's 8 B latency). A payload of at
    most one chunk is one round - the validation round itself. One entry point for every call:
    one compiled specialisation per dtype to load (runtime.init warms the float ones)."""
    n = x.shape[0]
    while True:
        o = c * chunk
        m = min(chunk, n - o)
        kc = k + c
        par = kc & 1
        if not posted:
            mine = slots[r, par]
            for i in range(m):
                mine[i] = x[o + i]
            b = p * 8 + (r * 2 + par) * 8
            ctrl[b] = 1
            ctrl[b + 1] = h
            _fence()  # payload and header before the counter (TSO keeps store order; this keeps the compiler's)
            ctrl[r * 8] = kc
            _fence()
        posted = False
        if not _arrived(ctrl, p, kc, tries):
            return LATE + c
        if _complete(ctrl, slots, out[o:o + m], p, kc, h, op) < 0:
            return MISMATCH - c
        c += 1
        if c * chunk >= n:
            return DONE


#: What _exchange returns: done, or a code carrying the chunk it stopped at.
DONE, LATE, MISMATCH = 0, 1, -1


def rounds(n: int, chunk: int) -> int:
    """Rounds a fused allreduce of n elements takes: one per chunk, and one for no payload (a
    validation round alone: api._delegated)."""
    return max(1, -(-n // chunk))


def run(st, comm, rec, slots, x, out, h, kop, chunk, entry=_exchange) -> bool:
    """The fused allreduce of the flat contiguous x into the flat out (x itself: in place) on
    the communicator's node state `st`, posting h: True when done, False when some rank posted
    another header (the caller raises the agreed error, validate._mismatch). The hot and the
    general path both call this, so ranks on either path meet in the same rounds. `entry`: the
    compiled round to call - numba's dispatcher, or a Plan's entry point when the caller knows
    the arguments have exactly its types (Plan.entry)."""
    k = st.k + 1
    n = x.shape[0]
    # every rank counts the same rounds (k + rounds(n, chunk) - 1): the signature (and so n) is agreed
    st.k = k + (n - 1) // chunk if n > chunk else k
    done = entry(st.ctrl, slots, x, out, st.r, st.p, k, h, kop, SPINS, False, chunk, 0)
    while done >= LATE:  # a peer is late: the yielding, interruptible wait, then check and fold
        c = done - LATE
        validate._slow(st.request(k + c), comm, rec, "allreduce")
        done = entry(st.ctrl, slots, x, out, st.r, st.p, k, h, kop, 1, True, chunk, c)
    if done != DONE:
        # only round k can differ (a rank on another call posts once); its peers counted one round
        st.k = k + MISMATCH - done
        return False
    return True


class Plan:
    """What the hot path needs about one call signature but its shape - (dtype, op, algorithm,
    in place) on one group's communicator - resolved once: the signature's hash without the
    shape (sig_hash), op codes, the typed slots, the largest payload that fuses, the group's
    stall key, and the compiled round's entry point. The shape enters every call's hash through
    ``shape_hash`` (a lookup), so a new shape makes no new plan: the first call at a size runs
    the warm path. Never a decision that depends on anything the round does not agree on (see
    the module docstring).

    ``entry`` is the compiled round's C entry point for exactly the argument types the hot path
    passes (this dtype's slots, flat C-contiguous aligned writeable x and out, ints, a bool):
    calling it skips numba's dispatcher, which types all 13 arguments on every call to pick
    that same specialisation (~0.2-0.4 us of an 8 B call: issue 16). The caller must pass
    exactly those types (api._hot checks ``x.flags.carray``; anything else goes through the
    dispatcher, ``_exchange``) - the entry point unboxes without checking."""

    __slots__ = ("h", "opc", "kop", "avg", "slots", "dtype", "limit", "chunk", "none", "entry",
                 "group", "gkey", "ranks")

    def __init__(self, st, h, dtype, opc, kop, group):
        self.h, self.opc, self.kop, self.avg = h, opc, kop, opc == AVG
        self.dtype = dtype
        self.slots = st.slots(dtype)
        self.limit = limit(st.p)
        self.chunk = chunk(st.p, dtype.itemsize)
        self.none = np.empty(0, dtype)  # the payload of a validation-only round (api._delegated)
        self.entry = entry(st.ctrl, self.slots, self.none)
        # the stall record's key of the group's blocking lane (stall.issue's, made once)
        self.group, self.gkey, self.ranks = group, f"{group.uid}:b", group.ranks


_entries: dict = {}  # dtype -> _exchange's entry point for a node state's ctrl and slots of it


def entry(ctrl, slots, flat):
    """The C entry point of _exchange for these arrays' types and the hot path's scalars
    (compiled, or loaded from numba's cache, if not yet: ``Dispatcher.compile`` - it runs
    nothing). `ctrl` and `slots`: a node state's (node.Node.ctrl, .slots(dtype): always of
    the same types for one dtype); `flat`: an array of the type of x and out, a 1-d C array of
    that dtype (Plan.none). Kept per dtype: asking the dispatcher again costs 70-190 us (typing
    and its compile lock), and every settings change (dt.set_validation) makes new plans - the
    first call after one paid that (bench_call_overhead's "first call" at 4 KiB, P = 2: 0.6-1.3
    ms on call6's code against 0.12-0.14 ms on main's)."""
    key = flat.dtype
    e = _entries.get(key)
    if e is None:
        args = (ctrl, slots, flat, flat, 0, 2, 1, 1, SUM, 1, False, 1, 0)
        e = _entries[key] = _exchange.compile(tuple(_exchange.typeof_pyval(a) for a in args))
    return e


_M64 = (1 << 64) - 1
_MASK = (1 << 63) - 1
_shapes: dict = {}  # shape tuple -> shape_hash (a pure function of the tuple: cached, bounded)


def _mix(z: int) -> int:
    """splitmix64's finaliser (Steele, Lea & Flood 2014): every input bit reaches every output bit."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def shape_hash(shape: tuple) -> int:
    """A 63-bit hash of a shape, the same in every process (Python's own hash of a tuple is not
    promised to be: only ints are unsalted). Chained, so (2, 3), (3, 2), (6,) and () differ."""
    h = _shapes.get(shape)
    if h is None:
        h = 0x243F6A8885A308D3  # pi's fraction bits: () hashes to something non-zero
        for d in shape:
            h = _mix(h ^ (int(d) & _M64))
        h = _mix(h ^ len(shape)) & _MASK
        if len(_shapes) < 65536:
            _shapes[shape] = h
    return h


def sig_hash(dtype, op, algorithm) -> int:
    """The allreduce signature's hash without its shape (validate._hash of the fields the round
    agrees on but the shape); ``sig_hash(...) ^ shape_hash(shape)`` is what the hot and the
    general path both post, so a rank on either path meets the others in the same round."""
    return validate._hash("allreduce", {"dtype": dtype.str, "op": op, "algorithm": algorithm})


def warmup(dtypes=(np.float32, np.float64, np.int32, np.int64)) -> None:
    """Compile (or load from numba's cache) the round for these dtypes: the first call at any
    size then runs compiled code (runtime.init warms float32 and float64: ~5 ms each once
    numba itself is loaded)."""
    p = 2
    ctrl = np.zeros(p * 24, np.int64)
    ctrl[:p * 8:8] = 1
    for t in dtypes:
        slots = np.zeros((p, 2, 4), t)
        x = np.ones(4, t)
        _exchange(ctrl, slots, x, np.empty(4, t), 0, p, 1, 0, SUM, 1, False, 4, 0)
