"""Small allreduces carried in the validation round (issue 16 item 4): one synchronisation per
call instead of two.

On a communicator with node-local shared memory (node.py) the validation round can carry up to
node.SMALL bytes beside each rank's fingerprint; after the round every rank folds the p payloads
in rank order (shm.fold, numba) - the same kernel on the same bytes, so every rank gets the same
bits (rank order, not the MPI library's order). api._allreduce asks ``payload`` for the bytes to
carry and, when validate.check says they travelled, ``finish`` for the result.
"""
from __future__ import annotations

import numpy as np

from .. import stall
from . import node
from .kernels import divide
from .ops import AVG, MAX, MIN
from .shm import fold


def keyed(kop: int, acc) -> bool:
    """min/max over floats reduce order keys (api._run_reduce, kernels.to_keys)."""
    return kop in (MIN, MAX) and acc.kind == "f"


def payload(comm, x, acc, kop, algorithm):
    """The bytes a small "auto" allreduce carries in its validation round, or None.

    Every condition is a function of what the round itself agrees on (shape, dtype, op,
    algorithm) and of the communicator (node state exists on all its ranks or none), so every
    rank takes the fused path or none does. min/max over floats are left to the algorithms
    (NaN and signed-zero semantics of the order keys, kernels.to_keys)."""
    nbytes = x.nbytes
    if (algorithm != "auto" or nbytes > node.SMALL or nbytes == 0 or acc is not x.dtype or keyed(kop, acc)
            or node.get(comm) is None):
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
