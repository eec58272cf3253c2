"""Point-to-point messages between pipeline chunks: activations forward, gradients backward.

Every message is a small shape header then the data, both with one tag that names the direction,
the receiving chunk and the micro-batch - so a receive matches exactly its message whatever else is
in flight between the two ranks (interleaved and zero-bubble schedules do not send in the order
the receiver consumes). Sends are MPI_Isend (two neighbours sending to each other at the same time,
as 1F1B does, cannot deadlock); the arrays stay referenced by their requests until ``sends`` are
waited for at the end of the step. Receives are tracked by the stall inspector and the flight
recorder (a stage waiting for its neighbour shows up by name, and counts as exposed communication).
"""
from __future__ import annotations

import numpy as np

from ... import stall

FWD, BWD = 0, 1
_HDR = 8  # header: ndim + up to 7 dims
_TAG0 = 100  # tags below are the old fixed pipeline tags; MPI guarantees tags up to 32767


class P2P:
    """The pipeline's messages on one communicator, in one dtype, for m micro-batches."""

    max_messages = 32767 - _TAG0

    def __init__(self, comm, dtype, micro_batches: int):
        self.comm, self.dtype, self.m = comm, dtype, micro_batches
        self.reset()

    def reset(self) -> None:
        self.sends, self.sent = [], 0

    def tag(self, direction: int, i: int, chunk: int) -> int:
        return _TAG0 + 2 * (chunk * self.m + i) + direction

    def send(self, a, dest: int, direction: int, i: int, chunk: int) -> None:
        """Send a to rank `dest`, for its chunk `chunk`, micro-batch i."""
        a = np.ascontiguousarray(a)
        if a.ndim >= _HDR:
            raise ValueError(f"pipeline activations must have fewer than {_HDR} dims, got shape {a.shape}")
        hdr = np.zeros(_HDR, np.int64)
        hdr[0] = a.ndim
        hdr[1:1 + a.ndim] = a.shape
        self.sent += a.nbytes
        tag = self.tag(direction, i, chunk)
        self.sends += [self.comm.Isend(hdr, dest, tag), self.comm.Isend(a, dest, tag)]

    def recv(self, src: int, direction: int, i: int, chunk: int):
        """The array rank `src` sent to this rank's chunk `chunk` for micro-batch i."""
        op = stall.enter(f"pipeline recv from stage {src}", None, group=None)
        tag = self.tag(direction, i, chunk)
        try:
            hdr = np.empty(_HDR, np.int64)
            self.comm.Recv(hdr, src, tag)
            out = np.empty(tuple(hdr[1:1 + hdr[0]]), self.dtype)
            self.comm.Recv(out, src, tag)
        finally:
            stall.leave(op)
        op.shape, op.dtype = out.shape, out.dtype
        return out
