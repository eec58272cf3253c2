"""The public communicator-level API, for authors of algorithms, compressors and communication
hooks (compression/, DataParallel): collectives on a raw MPI communicator and a flat contiguous
buffer, reduced in place, with the same algorithms, validation and cost model as the user-level
calls in api.py - but no Group resolution, no result allocation and no stall/flight record of
their own (the caller's operation is the record).

    from disttrain.comm import lowlevel as L
    L.allreduce_on(comm, buf, op="avg")                # in place; algorithm="auto" asks the cost model
    L.allgather_on(comm, buf, counts, displs)          # block `rank` filled in; afterwards all are
    L.ring_allreduce_on(comm, buf, "sum", codec)       # the ring with a narrow wire format (fp16/bf16)
    L.check(comm, "my hook", {"step": 3}, error=None)  # the cross-rank consistency check
    h = L.submit(fn, "my hook", buf, group)            # run fn() on the communication thread

Everything here is collective over `comm` and must be called in the same order on every rank.
"""
from __future__ import annotations

import numpy as np

from . import config, validate
from .api import _allreduce
from .costmodel import choose
from .engine import Handle, engine
from .ops import OPS
from .p2p import blocks
from .registry import ALLGATHER
from .ring import ring_allreduce

__all__ = ["allreduce_on", "allgather_on", "ring_allreduce_on", "check", "submit", "blocks", "validating",
           "Handle"]


def allreduce_on(comm, buf: np.ndarray, op: str = "sum", algorithm: str = "auto") -> np.ndarray:
    """Reduce `buf` (any shape, one of the reducing dtypes) over `comm` in place; returns it."""
    return _allreduce(comm, buf, op, algorithm, inplace=True)


def allgather_on(comm, buf: np.ndarray, counts, displs, algorithm: str = "auto") -> None:
    """`buf` (1-D, uint8 or any dtype) holds this rank's block at displs[rank] (counts[rank]
    elements); afterwards it holds every rank's block. `algorithm`: "auto" or an ALLGATHER name."""
    name = algorithm if algorithm != "auto" else choose("allgather", comm, buf.nbytes, buf.dtype)
    ALLGATHER.resolve(name)(comm, buf, counts, displs)


def ring_allreduce_on(comm, buf: np.ndarray, op: str, codec) -> None:
    """The ring allreduce on a 1-D float buffer whose messages go through `codec` (a narrow wire
    format, compression/lowp.py): reduced in the buffer's dtype, sent narrow."""
    ring_allreduce(comm, buf, OPS[op], codec)


def check(comm, kind: str, fields: dict, error: str | None = None, always: bool = False) -> None:
    """The cross-rank consistency check (validate.py): CollectiveError on every rank of `comm` if
    any rank passed `error` or different `fields`. Skipped while validation is off, unless `always`."""
    validate.check(comm, kind, fields, error, always)


def validating() -> bool:
    """Whether validation is on for this thread (the settings snapshot of the submitting thread on
    the communication thread)."""
    return config.current().validate


def submit(fn, name: str, x=None, group=None) -> Handle:
    """Run ``fn()`` on the communication thread (in queue order, with the caller's settings
    snapshot, recorded as an asynchronous operation of `group`); returns its Handle."""
    return engine.submit(fn, name, x, group)
