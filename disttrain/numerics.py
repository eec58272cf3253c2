"""Numerical fault detection: are the gradients finite before they are applied?

After DataParallel's allreduce every rank holds the same averaged gradients, and a NaN or Inf on
any rank has propagated into that average (NaN + x = NaN, Inf - Inf = NaN), so every rank reaches
the same verdict without communicating - skipping the step stays synchronous.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .nn.sparse import RowSparseGrad


@njit(nogil=True, cache=True)
def _finite(a):
    for i in range(a.shape[0]):
        v = a[i]
        if v - v != 0.0:  # NaN - NaN = NaN, Inf - Inf = NaN; finite - itself = 0
            return False
    return True


def all_finite(arrays) -> bool:
    """True when every element of every array (or Parameter's .grad) is finite; a row-sparse
    gradient's untouched rows are zero, so only its touched rows are looked at."""
    for a in arrays:
        a = getattr(a, "grad", a)
        if isinstance(a, RowSparseGrad):
            a = a.values
        flat = np.ascontiguousarray(a).reshape(-1)
        if flat.dtype.kind == "f" and flat.size and not _finite(flat):
            return False
    return True
