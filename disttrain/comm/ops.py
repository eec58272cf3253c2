"""Reduction operators and dtypes: names, codes, MPI equivalents and accumulation types.

The integer op codes are what the numba kernels branch on (see kernels.py).
"""
from __future__ import annotations

import numpy as np

from .. import mpi

SUM, PROD, MIN, MAX, AVG = 0, 1, 2, 3, 4
OPS = {"sum": SUM, "prod": PROD, "min": MIN, "max": MAX, "avg": AVG}

#: dtypes the reducing collectives accept. float16 is reduced in float32 (never sum in fp16:
#: partial sums overflow at 65504 and lose bits every step).
REDUCE_DTYPES = tuple(np.dtype(t) for t in ("float16", "float32", "float64", "int32", "int64"))
_ACCUM = {np.dtype("float16"): np.dtype("float32")}


def accum_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype in which `dtype` data is reduced and sent between ranks."""
    return _ACCUM.get(dtype, dtype)


def kernel_op(op: int) -> int:
    """The op the element-wise kernels apply: avg reduces as sum, then divides once at the end."""
    return SUM if op == AVG else op


def mpi_op(op: int):
    """The MPI.Op that the MPI library applies for `op` (avg = SUM then a division)."""
    MPI = mpi.MPI
    return {SUM: MPI.SUM, PROD: MPI.PROD, MIN: MPI.MIN, MAX: MPI.MAX, AVG: MPI.SUM}[op]
