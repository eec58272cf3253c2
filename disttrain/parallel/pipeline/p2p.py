"""Point-to-point messages between pipeline chunks: activations forward, gradients backward.

Every message's tag names the direction, the receiving chunk and the micro-batch - so a receive
matches exactly its message whatever else is in flight between the two ranks (interleaved and
zero-bubble schedules do not send in the order the receiver consumes). Sends are MPI_Isend (two
neighbours sending to each other at the same time, as 1F1B does, cannot deadlock); the arrays stay
referenced by their requests until ``sends`` are waited for at the end of the step. Receives are
tracked by the stall inspector and the flight recorder (a stage waiting for its neighbour shows up
by name, and counts as exposed communication).

Two modes per step, agreed by every rank of the pipeline at the step's start (``begin``):

- *headers*: each array goes as a small shape header then the data; the receiver allocates. The
  shapes seen are remembered, keyed by the step's input shape.
- *known shapes* (the previous step had the same input shape on the first stage, and every rank
  remembers the shapes of that input - the same verdict everywhere, from one allgather of the
  pipeline's step): no headers;
  every receive of the step is posted up front (MPI_Irecv into buffers reused from step to step, so
  data lands where it is read instead of in MPI's unexpected-message queue), and an op's receive is
  a wait. A layer whose output shape depends on the data, not on the input shape, is caught: the
  sender raises if a shape differs from the one remembered, the receiver if a message's size does.
"""
from __future__ import annotations

import numpy as np

from ... import mpi, stall

FWD, BWD = 0, 1
_HDR = 8  # header: ndim + up to 7 dims
_TAG0 = 100  # tags below are the old fixed pipeline tags; MPI guarantees tags up to 32767


class P2P:
    """The pipeline's messages on one communicator, in one dtype, for m micro-batches.

    ``cache`` False: always headers (the mode before known shapes; a benchmark's baseline)."""

    max_messages = 32767 - _TAG0

    def __init__(self, comm, dtype, micro_batches: int, cache: bool = True):
        self.comm, self.dtype, self.m, self.cache = comm, dtype, micro_batches, cache
        self.shapes, self.sent_shapes, self.cached_for = {}, {}, None
        self.buffers, self.posted, self.known = {}, {}, False
        self.reset()

    def reset(self) -> None:
        self.sends, self.sent = [], 0

    def tag(self, direction: int, i: int, chunk: int) -> int:
        return _TAG0 + 2 * (chunk * self.m + i) + direction

    def begin(self, input_key, cached: list, expected) -> None:
        """This step's mode, decided from the same arguments on every rank; in known-shape mode
        post every receive.

        Args:
            input_key: the first stage's input shape this step.
            cached: every rank's ``cached_for`` (gathered).
            expected: (src, direction, micro-batch, chunk) of every receive this rank makes."""
        self.reset()
        for req in self.posted.values():  # a step that raised left receives posted: withdraw them
            req.Cancel()
            req.Wait()
        self.posted = {}
        self.input_key = input_key
        self.known = self.cache and all(c == input_key for c in cached)
        if not self.known:
            self.forget()
            return
        for src, direction, i, chunk in expected:
            key = (direction, i, chunk)
            buf = self.buffers.get(key)
            if buf is None or buf.shape != self.shapes[key]:
                buf = self.buffers[key] = np.empty(self.shapes[key], self.dtype)
            self.posted[key] = self.comm.Irecv(buf, src, self.tag(direction, i, chunk))

    def forget(self) -> None:
        """Headers from now on, until a step completes and its shapes are remembered."""
        self.known, self.cached_for, self.shapes, self.sent_shapes = False, None, {}, {}

    def end(self) -> None:
        """The step completed: its shapes are known for its input shape."""
        self.cached_for = self.input_key if self.cache else None

    def send(self, a, dest: int, direction: int, i: int, chunk: int) -> None:
        """Send a to rank `dest`, for its chunk `chunk`, micro-batch i."""
        a = np.ascontiguousarray(a, dtype=self.dtype)
        key, tag = (dest, direction, i, chunk), self.tag(direction, i, chunk)
        self.sent += a.nbytes
        if self.known:
            if self.sent_shapes.get(key) != a.shape:
                raise ValueError(f"pipeline: micro-batch {i}'s {'activation' if direction == FWD else 'gradient'} "
                                 f"has shape {a.shape}, not {self.sent_shapes.get(key)} as in the last step with "
                                 "the same input shape: shapes that depend on the data need Pipeline(cache_shapes=False)")
            self.sends.append(self.comm.Isend(a, dest, tag))
            return
        if a.ndim >= _HDR:
            raise ValueError(f"pipeline activations must have fewer than {_HDR} dims, got shape {a.shape}")
        hdr = np.zeros(_HDR, np.int64)
        hdr[0] = a.ndim
        hdr[1:1 + a.ndim] = a.shape
        self.sent_shapes[key] = a.shape
        self.sends += [self.comm.Isend(hdr, dest, tag), self.comm.Isend(a, dest, tag)]

    def recv(self, src: int, direction: int, i: int, chunk: int):
        """The array rank `src` sent to this rank's chunk `chunk` for micro-batch i."""
        op = stall.enter(f"pipeline recv from stage {src}", None, group=None)
        key, tag = (direction, i, chunk), self.tag(direction, i, chunk)
        try:
            if self.known:
                status = mpi.MPI.Status()
                self.posted.pop(key).Wait(status)
                out = self.buffers[key]
                if status.Get_count(mpi.MPI.BYTE) != out.nbytes:
                    raise ValueError(f"pipeline: micro-batch {i} from stage {src} has {status.Get_count(mpi.MPI.BYTE)} "
                                     f"bytes, not {out.nbytes} as in the last step with the same input shape")
            else:
                hdr = np.empty(_HDR, np.int64)
                self.comm.Recv(hdr, src, tag)
                out = np.empty(tuple(hdr[1:1 + hdr[0]]), self.dtype)
                self.comm.Recv(out, src, tag)
                self.shapes[key] = out.shape
        finally:
            stall.leave(op)
        op.shape, op.dtype = out.shape, out.dtype
        return out
