"""Stage-to-stage messages through the node's shared memory (issue 19's hand-off).

On one node a pipeline message need not go through MPI at all: the sender can write it where the
receiver reads it. Measured on MPICH (docs/MEASUREMENTS.md, pipelines, fifth round), a hand-off - the sender's compute end
to its waiting receiver's compute start - cost 114-183 us, most of it MPI's own path (an
``MPI_Isend`` cold after a long op 23-63 us, then the library's delivery through its cells and
progress engine). Here a message is one copy into a slot of an MPI-3 shared window
(``MPI_Win_allocate_shared`` on the ranks of one node), a release fence, one store of a sequence
stamp, and - only when the receiver sleeps - one ``FUTEX_WAKE``; the receiver sees the stamp,
takes an acquire fence and computes straight from the slot (no copy out). This is the design of
the single-node paths of MPICH's and Open MPI's shared-memory transports and of NCCL's
point-to-point P2P/SHM transports, without the library between (Graham & Shipman 2008;
Brightwell et al. 2010's "single-copy" argument: the receiver reads the sender's write).

**Slots.** Per ordered pair (sender, receiver) on one node, one slot per message of a step
(direction, micro-batch, receiving chunk): the same reused per-message buffers the MPI
known-shape path already pre-posts its receives into (p2p.py), now in shared memory, so the
channel holds no more memory than that path. A slot is laid out from the message's known
signature (its parts back to back, each 64-byte aligned). The "ring" of a pair is therefore one
step long and its flow control is the step boundary: a sender writes step e + 1's message only
after the pipeline's step-start allgather of step e + 1, which every rank enters only after its
whole program of step e - every read of every slot - has run. No slot is ever waited for by a
sender.

**Stamps and waking.** Slot j's word (its own cache line) holds the step number (epoch) of the
last message written there. The sender: copy, fence, store the epoch, fence, look at the pair's
"receiver sleeps" flag and, if set, ``futex.wake`` the word. The receiver: spin a little on the
word (numba, nogil: the watchdog thread runs), then set the flag, fence, look again, and sleep in
``futex.wait`` on the word with the value it saw (the kernel refuses to sleep if the word changed:
no lost wake-up; Drepper 2011). The fences are node.py's ``fence seq_cst``: either the receiver
sees the stamp or the sender sees the flag (Dekker's pattern, which needs the full fence - a
release store alone would let the flag's load pass the stamp's store).

**Agreement.** Which pairs use the channel is decided from the group's agreed topology
(``topology.of``: the same node numbering on every rank; DISTTRAIN_FAKE_NODES splits nodes
and pairs across them stay on MPI) and from the transport given at construction (checked by
``validate.check``). Slot layouts come from the shapes each side remembers of the last step with
this input shape (the sender's sent signatures, the receiver's received ones): one allgather of
every rank's view when the channel is (re)laid out, and every rank raises the same
CollectiveError if a pair's two views differ - never a hang or a misread slot. The window is
allocated collectively with the agreed size and reused from a per-group pool while it fits.

**A peer that fails.** A receive that waits is recorded by the stall inspector with its source's
world rank, exactly as an MPI receive of the pipeline (p2p.py): a source that leaves the job ends
it after ``stall.P2P_DEPARTED_GRACE`` (the watchdog thread aborts; the futex sleep is at most
``_NAP`` and releases the GIL), one that raises ends it through the job-wide excepthook, and a
long wait is reported by the stall watchdog.
"""
from __future__ import annotations

import sys
import time
import weakref

import numpy as np
from numba import njit

from ... import mpi, stall
from ...comm import futex, topology
from ...comm import node as N
from ...errors import CollectiveError
from ...groups import on_free
from .. import windows
from . import activations as A

TRANSPORTS = ("mpi", "shm")
_LINE = 8  # int64 words per cache line: each stamp and flag alone on its line
_ALIGN = 64
# looks at a stamp before a receiver sleeps: ~5 us on this VM (2000 looks of one word, measured
# 4.6 us) - long enough for a message already on its way, short enough that a waiting stage does
# not take the cycles its neighbour's compute needs (see Channel._sleep)
_SPINS = 2000
_NAP = 1e-3  # seconds a sleeping receiver waits at most before it looks again
_JIT = dict(nogil=True, cache=True, boundscheck=False)
_warm = False  # the kernels' compiled code is loaded (once per process)
_pools: dict = {}  # group uid -> [_Window], in creation order (the same list on every rank)


@njit(**_JIT)
def _ready(words, i, stamp, tries):
    """True once words[i] >= stamp (up to `tries` looks); the fence after the look is the
    acquire: the slot's payload is read only after the stamp that published it."""
    for _ in range(tries):
        if words[i] >= stamp:
            N.fence()
            return True
        N.fence()
    return False


@njit(**_JIT)
def _publish(words, i, stamp, flag):
    """Store the stamp after the payload (release), then look whether the receiver sleeps."""
    N.fence()
    words[i] = stamp
    N.fence()
    return words[flag] != 0


@njit(**_JIT)
def _doze(words, flag, i, on):
    """Set the receiver's flag to `on`, fence, and return what words[i] holds now."""
    words[flag] = on
    N.fence()
    return words[i]


def warmup() -> None:
    """Load the kernels' compiled code (numba's cache) before the first message."""
    w = np.zeros(2 * _LINE, np.int64)
    _ready(w, 0, 0, 1)
    _publish(w, 0, 0, _LINE)
    _doze(w, _LINE, 0, 0)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _bytes(sig) -> list:
    """Each part's bytes (None for a None part) of a message signature (p2p._signature)."""
    return [None if p is None else int(np.prod(p[1], dtype=np.int64)) * p[0].itemsize for p in sig[1]]


class _Window:
    """One shared allocation (by the node's first rank) and the Channel that uses it."""

    def __init__(self, comm, nbytes: int):
        MPI = mpi.MPI
        self.nbytes = nbytes
        self.win = MPI.Win.Allocate_shared(nbytes if comm.Get_rank() == 0 else 0, 1, comm=comm)
        buf, _ = self.win.Shared_query(0)
        self.mem = np.frombuffer(buf, np.uint8)
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self.user = None  # weakref to the Channel laid out in it

    def free_here(self) -> bool:
        return self.user is None or self.user() is None or self.user().window is not self

    def unviewed(self) -> bool:
        """No array of this process views the window's memory - a layer's cache of an earlier step
        (its input: a slot) may, and unmapping the window under it would crash a later read."""
        return sys.getrefcount(self.mem) <= 2  # views' base is self.mem: only this attribute and the argument

    def release(self) -> None:
        """Unmap the window (collective over its node communicator)."""
        self.win.Unlock_all()
        self.win.Free()
        self.mem = None


def _give_back(group) -> None:
    """Group.free: the group's windows that no rank uses or views any more are unmapped."""
    windows.give_back(group, _pools.pop(group.uid, []), lambda w: w.free_here() and w.unviewed(), _Window.release)


on_free(_give_back)


class Channel:
    """The shared-memory messages of one pipeline (its group's communicator), for the pairs of
    ranks that share a node.

    Args:
        comm: the pipeline group's communicator (group rank = stage).
        uid: the group's uid (its window pool; the same on every rank).
    """

    def __init__(self, comm, uid: str):
        self.comm, self.uid = comm, uid
        self.p, self.r = comm.Get_size(), comm.Get_rank()
        t = topology.of(comm)
        # nodes from the agreed topology (a communicator disttrain did not make has none: all MPI)
        self.node_of = t.node_of if t is not None else tuple(range(self.p))
        self.wcomm = comm if t is None or t.nodes == 1 else t.node_comm
        self.window = None
        self.words = None
        self.epoch = 0
        self.inbound: dict = {}  # (direction, i, chunk) -> (stamp word, flag word, result, nbytes, src)
        self.outbound: dict = {}  # (dest, direction, i, chunk) -> (stamp word, flag word, [part views], address, nbytes)
        self.laid_for = None
        self.waited = 0.0  # seconds this step's receives slept or spun past _SPINS (P2P.waited)
        global _warm
        if not _warm:
            warmup()
            _warm = True

    def local(self, other: int) -> bool:
        """Whether group rank `other` shares this rank's node (its messages use the channel)."""
        return other != self.r and self.node_of[other] == self.node_of[self.r]

    # ----------------------------------------------------------------------------- layout
    def lay_out(self, key, incoming: dict, outgoing: dict) -> None:
        """Lay the slots out for the signatures of the last completed step (collective over the
        group: every rank, the same step). incoming: {(direction, i, chunk): (src, sig)};
        outgoing: {(dest, direction, i, chunk): sig}. Raises CollectiveError on every rank if a
        pair's sender and receiver remember different messages."""
        mine_in = sorted((src, k, sig) for k, (src, sig) in incoming.items() if self.local(src))
        mine_out = sorted((k[0], k[1:], sig) for k, sig in outgoing.items() if self.local(k[0]))
        views = self.comm.allgather((mine_in, mine_out))
        pairs: dict = {}  # (src, dst) -> [(key, sig)], sorted: the receiver's view
        for d, (ins, _) in enumerate(views):
            for src, k, sig in ins:
                pairs.setdefault((src, d), []).append((k, sig))
        sent: dict = {}
        for s, (_, outs) in enumerate(views):
            for dst, k, sig in outs:
                sent.setdefault((s, dst), []).append((k, sig))
        bad = sorted(pr for pr in set(pairs) | set(sent) if pairs.get(pr) != sent.get(pr))
        if bad:
            s, d = bad[0]
            raise CollectiveError(
                f"pipeline shared-memory channel: stage {s} would send stage {d} {len(sent.get((s, d), []))} "
                f"messages ({sent.get((s, d), [])[:2]}...) but stage {d} expects {len(pairs.get((s, d), []))} "
                f"({pairs.get((s, d), [])[:2]}...); the stages remember different shapes of the last step")
        here = self.node_of[self.r]
        mine = sorted(pr for pr in pairs if self.node_of[pr[1]] == here)
        # words: per pair a flag line, then a stamp line per message; then the payloads
        n_words = sum(1 + len(pairs[pr]) for pr in mine) * _LINE
        total = n_words * 8
        place = {}
        wi = 0
        for pr in mine:
            flag, wi = wi, wi + _LINE
            for k, sig in pairs[pr]:
                offs = []
                for nb in _bytes(sig):
                    offs.append(None if nb is None else total)
                    total += 0 if nb is None else _aligned(max(nb, 1))
                place[(pr, k)] = (wi, flag, offs, sig)
                wi += _LINE
        self.words, self.inbound, self.outbound = None, {}, {}  # no view of the old window left here
        self._window_of(max(total, _ALIGN))
        mem = self.window.mem
        self.words = mem[:n_words * 8].view(np.int64)
        base = self.words.ctypes.data
        self.inbound, self.outbound = {}, {}
        for (pr, k), (w, flag, offs, sig) in place.items():
            parts = [None if o is None else mem[o:o + int(np.prod(p[1], dtype=np.int64)) * p[0].itemsize]
                     .view(p[0]).reshape(p[1]) for o, p in zip(offs, sig[1])]
            nbytes = sum(b for b in _bytes(sig) if b)
            if pr[1] == self.r:
                self.inbound[k] = (w, flag, tuple(parts) if sig[0] else parts[0], nbytes, pr[0])
            elif pr[0] == self.r:
                self.outbound[(pr[1], *k)] = (w, flag, [q for q in parts if q is not None], base + 8 * w, nbytes)
        # a fresh start: every stamp and flag 0 before any rank publishes (node rank 0 clears the
        # whole word area; the group's barrier orders it before every sender's first store)
        if self.wcomm.Get_rank() == 0:
            self.words[:] = 0
        self.window.win.Sync()
        self.comm.Barrier()
        self.window.win.Sync()
        self.epoch, self.laid_for = 0, key

    def _window_of(self, nbytes: int) -> None:
        """A window of at least `nbytes` for this channel: the first of the group's pool free on
        every rank of the node and large enough, else a new one (collective over the group)."""
        pool = _pools.setdefault(self.uid, [])
        if self.window is not None:
            self.window.user = None  # this channel's own window is free for its new layout
        n = len(pool)
        # per window: free and large enough; free and viewed by no array (may be unmapped)
        flags = np.array([int(w.free_here() and w.nbytes >= nbytes) for w in pool] +
                         [int(w.free_here() and w.unviewed()) for w in pool], np.int32)
        if n:  # per-rank liveness (garbage collection, live arrays) agreed: the group's minimum
            self.comm.Allreduce(mpi.MPI.IN_PLACE, flags, op=mpi.MPI.MIN)
        chosen = next((w for w, ok in zip(pool, flags[:n]) if ok), None)
        if chosen is None:
            # before a new window, give back those no rank uses or views any more: the pool held
            # the sum of every layout ever made (attack8, finding 01: batches that grow). The
            # minimum makes the set the same on every rank; MPI_Win_free is collective over the
            # window's node communicator, all of whose ranks are in this group's lay_out.
            for w, gone in zip(list(pool), flags[n:]):
                if gone:
                    w.release()
                    pool.remove(w)
            chosen = _Window(self.wcomm, nbytes)
            pool.append(chosen)
        chosen.user = weakref.ref(self)
        self.window = chosen

    def forget(self) -> None:
        """The shapes are no longer known: lay out again at the next known-shape step."""
        self.laid_for = None

    # -------------------------------------------------------------------------- messages
    def begin(self) -> None:
        """A known-shape step starts (after the step's allgather): its messages' stamp."""
        self.epoch += 1

    def put(self, plan, data) -> int:
        """Write the parts `data` (arrays of the slot's shapes) into the slot and publish it."""
        w, flag, views, address, nbytes = plan
        for v, d in zip(views, data):
            np.copyto(v, d)
        if _publish(self.words, w, self.epoch, flag):
            futex.wake(address)
        return nbytes

    def take(self, plan, world_src: int):
        """The message of `plan` (its slot's views), waiting for it if it is not there yet."""
        w, flag, result, _, src = plan
        if not _ready(self.words, w, self.epoch, _SPINS):
            self._sleep(w, flag, src, world_src, result)
        return result

    def _sleep(self, w: int, flag: int, src: int, world_src: int, result) -> None:
        """Wait for slot word w asleep on its futex, tracked by the stall inspector (a source that
        leaves the job ends it, as for an MPI receive). The receiver has spun only ``_SPINS`` looks
        (take) before it gets here: the sixth round's receiver spun for up to 50 ms when every
        rank had a vCPU, and on this VM (two vCPUs sharing one core's resources) that spin took
        the cycles the peer's GEMMs needed - real MLP stages at pp 2 ran 1.4-4x slower per step
        than over MPI (README, pipelines). Asleep it costs its neighbour nothing; the sender's
        ``_publish`` sees the flag and wakes it (no lost wake-up: the kernel compares the word
        with the value seen after the flag was set, Drepper 2011)."""
        t = time.perf_counter()
        op = stall.enter(f"pipeline recv from stage {src}", A.parts(result)[0], site="pipeline shm channel", group=None)
        op.ranks = (world_src,)
        words, stamp, address = self.words, self.epoch, self.words.ctypes.data + 8 * w
        try:
            while True:  # each futex wait at most _NAP: the watchdog thread and a departed peer are seen
                seen = int(_doze(words, flag, w, 1))
                if seen >= stamp:
                    break
                futex.wait(address, seen, _NAP)
            _ready(words, w, stamp, 1)  # the acquire fence before the payload is read
        finally:
            _doze(words, flag, w, 0)
            stall.leave(op)
            self.waited += time.perf_counter() - t
