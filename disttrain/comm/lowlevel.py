"""The public communicator-level API, for authors of algorithms, compressors and communication
hooks (compression/, DataParallel): collectives on a raw MPI communicator and a flat contiguous
buffer, reduced in place, with the same algorithms, validation and cost model as the user-level
calls in api.py - but no Group resolution, no result allocation and no stall/flight record of
their own (the caller's operation is the record).

    from disttrain.comm import lowlevel as L
    L.allreduce_on(comm, buf, op="avg")                # in place; algorithm="auto" asks the cost model
    L.allgather_on(comm, buf, counts, displs)          # block `rank` filled in; afterwards all are
    L.reduce_scatter_on(comm, buf, counts, displs)     # -> block `rank` of the reduction
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
from .kernels import divide
from .engine import Handle, engine
from .ops import AVG, OPS, kernel_op
from .p2p import blocks
from .registry import ALLGATHER, REDUCE_SCATTER
from .ring import ring_allreduce

__all__ = ["allreduce_on", "allgather_on", "reduce_scatter_on", "ring_allreduce_on", "check", "submit", "blocks", "validating",
           "Handle"]


def allreduce_on(comm, buf: np.ndarray, op: str = "sum", algorithm: str = "auto") -> np.ndarray:
    """Reduce `buf` (any shape, one of the reducing dtypes) over `comm` in place; returns it."""
    return _allreduce(comm, buf, op, algorithm, inplace=True)


def allgather_on(comm, buf: np.ndarray, counts, displs, algorithm: str = "auto") -> None:
    """`buf` (1-D, uint8 or any dtype) holds this rank's block at displs[rank] (counts[rank]
    elements); afterwards it holds every rank's block. `algorithm`: "auto" or an ALLGATHER name."""
    name = algorithm if algorithm != "auto" else choose("allgather", comm, buf.nbytes, buf.dtype)
    ALLGATHER.resolve(name)(comm, buf, counts, displs)


def reduce_scatter_on(comm, buf: np.ndarray, counts, displs, op: str = "sum", algorithm: str = "auto") -> np.ndarray:
    """Reduce the 1-D float32/float64 `buf` over `comm`; returns block `rank` of the result
    (counts[rank] elements from displs[rank]: a view of `buf` or a new array). The rest of `buf`
    is undefined afterwards (the ring reduces in place). `algorithm`: "auto" or a REDUCE_SCATTER name."""
    if buf.dtype not in (np.float32, np.float64) or buf.ndim != 1 or op not in ("sum", "avg"):
        raise TypeError(f"reduce_scatter_on sums or averages a 1-D float32/float64 buffer, got {op!r} on "
                        f"{buf.dtype} {buf.shape}")
    code = OPS[op]
    name = algorithm if algorithm != "auto" else choose("reduce_scatter", comm, buf.nbytes, buf.dtype)
    block = REDUCE_SCATTER.resolve(name)(comm, buf, kernel_op(code), counts, displs)
    if code == AVG:
        divide(block, comm.Get_size())
    return block


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


def submit(fn, name: str, x=None, group=None, inline: bool = False) -> Handle:
    """Run ``fn()`` on the communication thread (in queue order, with the caller's settings
    snapshot, recorded as an asynchronous operation of `group`); returns its Handle.
    ``inline=True``: run it on the calling thread instead when the communication thread is idle
    (for a caller that waits for it right away; see ``Engine.submit``)."""
    return engine.submit(fn, name, x, group, inline)
