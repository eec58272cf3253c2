"""Point-to-point messages between pipeline chunks: activations forward, gradients backward.

Every message's tag names the direction, the receiving chunk and the micro-batch - so a receive
matches exactly its message whatever else is in flight between the two ranks (interleaved and
zero-bubble schedules do not send in the order the receiver consumes). Sends are MPI_Isend (two
neighbours sending to each other at the same time, as 1F1B does, cannot deadlock); the arrays stay
referenced by their requests until ``sends`` are waited for at the end of the step. A receive
that has to wait is tracked by the stall inspector and the flight recorder (a stage waiting for
its neighbour shows up by name, and counts as exposed communication; a neighbour that leaves the
job meanwhile ends it, named - stall.P2P_DEPARTED_GRACE); one whose message is already
here costs one MPI_Test and is not recorded (entering the inspector was most of a receive's cost).

Two modes per step, agreed by every rank of the pipeline at the step's start (``begin``):

- *headers*: each message goes as a small header - its structure: an array or a tuple of them
  (activations.py), each part's dtype and shape, None parts - then one message per part, same tag
  (MPI keeps their order); the receiver allocates. The structures seen are remembered, keyed by
  the step's input shapes.
- *known shapes* (the previous step had the same input shape on the first stage, and every rank
  remembers the shapes of that input - the same verdict everywhere, from one allgather of the
  pipeline's step): no headers;
  every receive of the step is posted up front (MPI_Irecv into buffers reused from step to step, so
  data lands where it is read instead of in MPI's unexpected-message queue), and an op's receive is
  a wait. A layer whose output shape depends on the data, not on the input shape, is caught: the
  sender raises if a shape differs from the one remembered, the receiver if a message's size does.

In known-shape mode with ``transport="shm"`` the messages between ranks of one node skip MPI: the
sender writes into the receiver's slot of a shared window and the receiver computes from it
(channel.py); nothing is posted for them, and messages to ranks on other nodes stay as above.
"""
from __future__ import annotations

import time

import numpy as np

from ... import mpi, stall
from . import activations as A
from .channel import Channel

FWD, BWD = 0, 1
_HDR = 64  # header: tuple flag, part count, then per part: dtype code (0: None), ndim, dims
_TAG0 = 100  # tags below are the old fixed pipeline tags; MPI guarantees tags up to 32767
_SITE = "pipeline p2p"  # the stall inspector's site of a receive (no stack walk per message)


def _signature(a) -> tuple:
    """(is_tuple, per part (dtype, shape) or None): what a message's header says. Parts travel in
    their own dtype (a stage without parameters - DLRM's interaction - has no dtype of its own)."""
    return isinstance(a, tuple), tuple(None if p is None else (p.dtype, p.shape) for p in A.parts(a))


def _header(sig) -> np.ndarray:
    hdr, k = np.zeros(_HDR, np.int64), 2
    hdr[0], hdr[1] = sig[0], len(sig[1])
    for part in sig[1]:
        shape = () if part is None else part[1]
        if k + 2 + len(shape) > _HDR:
            raise ValueError(f"pipeline activation too complex for a {_HDR}-entry header: {sig}")
        hdr[k] = 0 if part is None else ord(part[0].char)
        hdr[k + 1] = len(shape)
        hdr[k + 2:k + 2 + len(shape)] = shape
        k += 2 + len(shape)
    return hdr


def _parse(hdr) -> tuple:
    out, k = [], 2
    for _ in range(int(hdr[1])):
        code, nd = int(hdr[k]), int(hdr[k + 1])
        out.append(None if code == 0 else (np.dtype(chr(code)), tuple(int(d) for d in hdr[k + 2:k + 2 + nd])))
        k += 2 + nd
    return bool(hdr[0]), tuple(out)


class P2P:
    """The pipeline's messages on one communicator, for m micro-batches.

    ``cache`` False: always headers (the mode before known shapes; a benchmark's baseline).
    ``transport`` "shm": known-shape messages between ranks of one node go through the node's
    shared memory (channel.py; ``uid``: the group's, for its window pool), the others through MPI.
    """

    max_messages = 32767 - _TAG0

    def __init__(self, comm, micro_batches: int, cache: bool = True, transport: str = "mpi", uid: str = ""):
        self.comm, self.m, self.cache = comm, micro_batches, cache
        self.chan = Channel(comm, uid) if transport == "shm" and comm.Get_size() > 1 else None
        self._inbound, self._outbound = {}, {}  # this step's channel slots (empty: all MPI)
        self.shapes, self.sent_shapes, self.cached_for = {}, {}, None
        self.buffers, self.posted, self.known = {}, {}, False
        self._status = None  # an MPI.Status, made at the first begin (mpi4py is imported lazily)
        # each group rank's world rank: a receive names its source to the stall inspector, which
        # ends the job if that rank leaves (exits) while this one waits for it
        mine, world = comm.Get_group(), mpi.MPI.COMM_WORLD.Get_group()
        self.world_ranks = mpi.MPI.Group.Translate_ranks(mine, list(range(comm.Get_size())), world)
        mine.Free(), world.Free()
        self.reset()

    def reset(self) -> None:
        # waited: seconds this step's receives spent waiting for a message not yet there (only the
        # wait path is timed: a message already here adds nothing) - what the runtime's own time
        # per op is told apart from with (Pipeline.stats["runtime_s"])
        self.sends, self.sent, self._waited = [], 0, 0.0
        if self.chan is not None:
            self.chan.waited = 0.0

    @property
    def waited(self) -> float:
        """Seconds this step's receives waited for a message not yet there (MPI and channel)."""
        return self._waited + (self.chan.waited if self.chan is not None else 0.0)

    def tag(self, direction: int, i: int, chunk: int) -> int:
        return _TAG0 + 2 * (chunk * self.m + i) + direction

    def begin(self, input_key, cached: list, expected) -> None:
        """This step's mode, decided from the same arguments on every rank; in known-shape mode
        post every receive.

        Args:
            input_key: the first stage's input shapes this step (``activations.shape_key``).
            cached: every rank's ``cached_for`` (gathered).
            expected: (src, direction, micro-batch, chunk) of every receive this rank makes."""
        self.reset()
        for reqs, _ in self.posted.values():  # a step that raised left receives posted: withdraw them
            for req, _, _ in reqs:
                req.Cancel()
                req.Wait()
        self.posted = {}
        if self._status is None:
            self._status, self._byte = mpi.MPI.Status(), mpi.MPI.BYTE
        self.input_key = input_key
        self.known = self.cache and all(c == input_key for c in cached)
        self._inbound, self._outbound = {}, {}
        if not self.known:
            self.forget()
            return
        chan = self.chan
        if chan is not None:  # every rank here (known is agreed), and laid_for is the same everywhere
            if chan.laid_for != input_key:
                chan.lay_out(input_key, {(d, i, c): (src, self.shapes[(d, i, c)]) for src, d, i, c in expected},
                             self.sent_shapes)
            chan.begin()
            self._inbound, self._outbound = chan.inbound, chan.outbound
        for src, direction, i, chunk in expected:
            key, tag = (direction, i, chunk), self.tag(direction, i, chunk)
            if key in self._inbound:
                continue  # in a shared-memory slot: nothing to post
            sig = self.shapes[key]
            bufs = self.buffers.get(key)
            if bufs is None or bufs[0] != sig:
                bufs = self.buffers[key] = (sig, [None if p is None else np.empty(p[1], p[0]) for p in sig[1]])
            out = bufs[1]
            # several parts with one tag: MPI matches them in the order they were sent (non-overtaking);
            # per receive its request, buffer and size, and what recv returns - worked out here, not
            # between "the message arrived" and "the stage computes"
            self.posted[key] = ([(self.comm.Irecv(b, src, tag), b, b.nbytes) for b in out if b is not None],
                                tuple(out) if sig[0] else out[0])

    def forget(self) -> None:
        """Headers from now on, until a step completes and its shapes are remembered."""
        self.known, self.cached_for, self.shapes, self.sent_shapes = False, None, {}, {}
        if self.chan is not None:
            self.chan.forget()

    def end(self) -> None:
        """The step completed: its shapes are known for its input shape."""
        self.cached_for = self.input_key if self.cache else None

    def send(self, a, dest: int, direction: int, i: int, chunk: int) -> None:
        """Send a (an array or a tuple of arrays / None: activations.py) to rank `dest`, for its
        chunk `chunk`, micro-batch i."""
        key, tag = (dest, direction, i, chunk), self.tag(direction, i, chunk)
        if self.known:
            want = self.sent_shapes.get(key)
            slot = self._outbound.get(key)
            if type(a) is np.ndarray:  # the common case without building a signature (the per-op cost)
                ok = want is not None and not want[0] and want[1][0] == (a.dtype, a.shape)
                if ok and slot is not None:  # into the receiver's slot (any layout: a copy)
                    self.sent += self.chan.put(slot, (a,))
                    return
                if ok and a.flags.c_contiguous:  # on the wire first, the accounting after
                    self.sends.append(self.comm.Isend(a, dest, tag))
                    self.sent += a.nbytes
                    return
                data = [np.ascontiguousarray(a)]
            else:
                ok = _signature(a) == want
                data = [p for p in A.parts(a) if p is not None]
            if not ok:
                raise ValueError(f"pipeline: micro-batch {i}'s {'activation' if direction == FWD else 'gradient'} "
                                 f"has shapes {_signature(a)}, not {want} as in the last step with "
                                 "the same input shape: shapes that depend on the data need Pipeline(cache_shapes=False)")
            if slot is not None:
                self.sent += self.chan.put(slot, data)
                return
            data = [np.ascontiguousarray(d) for d in data]
        else:
            sig = _signature(a)
            data = [np.ascontiguousarray(p) for p in A.parts(a) if p is not None]
            self.sent_shapes[key] = sig
            self.sends.append(self.comm.Isend(_header(sig), dest, tag))
        for d in data:
            self.sent += d.nbytes
            self.sends.append(self.comm.Isend(d, dest, tag))

    def _wait(self, req, status, src: int, buf) -> None:
        """Wait for a posted receive whose message is not here yet, tracked by the stall inspector."""
        t = time.perf_counter()
        op = stall.enter(f"pipeline recv from stage {src}", buf, site=_SITE, group=None)
        op.ranks = (self.world_ranks[src],)
        try:
            req.Wait(status)
        finally:
            stall.leave(op)
            self._waited += time.perf_counter() - t

    def recv(self, src: int, direction: int, i: int, chunk: int):
        """What rank `src` sent to this rank's chunk `chunk` for micro-batch i."""
        key = (direction, i, chunk)
        if self.known:
            slot = self._inbound.get(key)
            if slot is not None:  # the sender writes it into this rank's slot: read it there
                return self.chan.take(slot, self.world_ranks[src])
            reqs, result = self.posted.pop(key)
            status = self._status
            for req, buf, nbytes in reqs:
                # a message already here costs one MPI_Test; only a real wait is tracked by the stall
                # inspector and the flight recorder (entering it is most of a tracked receive's cost)
                if not req.Test(status):
                    self._wait(req, status, src, buf)
                if status.Get_count(self._byte) != nbytes:
                    raise ValueError(f"pipeline: micro-batch {i} from stage {src} has "
                                     f"{status.Get_count(self._byte)} bytes, not {nbytes} as in the last "
                                     "step with the same input shape")
            return result
        else:
            t = time.perf_counter()
            op = stall.enter(f"pipeline recv from stage {src}", None, site=_SITE, group=None)
            op.ranks = (self.world_ranks[src],)
            try:
                hdr = np.empty(_HDR, np.int64)
                tag = self.tag(direction, i, chunk)
                self.comm.Recv(hdr, src, tag)
                sig = _parse(hdr)
                is_tuple = sig[0]
                out = [None if p is None else np.empty(p[1], p[0]) for p in sig[1]]
                for b in out:
                    if b is not None:
                        self.comm.Recv(b, src, tag)
                self.shapes[key] = sig
            finally:
                stall.leave(op)
                self._waited += time.perf_counter() - t  # headers: the whole receive counts as waiting
            first = next((b for b in out if b is not None), None)
            if first is not None:
                op.shape, op.dtype = first.shape, first.dtype
        return tuple(out) if is_tuple else out[0]
