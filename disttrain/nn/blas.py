"""C += A^T B in one BLAS call, without the temporary NumPy's ``c += a.T @ b`` makes.

A layer's weight gradient is accumulated (``W.grad += x^T dy``): NumPy computes ``x^T dy`` into a
new array and adds it - a gradient-sized temporary written and read again: for
the MLP of scripts/bench_scaling.py 15 MB of extra memory traffic per step, on a memory bus two
ranks share. GEMM itself accumulates (``C = alpha A B + beta C`` with beta = 1, BLAS level 3,
Dongarra et al. 1990), so :func:`add_at_b` hands C to the BLAS NumPy already loads (its bundled
OpenBLAS, ``numpy.libs``) and the gradient is read and written once, inside the GEMM. Measured
alone (one thread, 128 x 784 and 128 x 1024 inputs, 1024 columns): 5-8% less time per gradient.

Where that library or its symbols are not found (another NumPy build), the arrays are not
plain C-contiguous float32/float64, or C overlaps A or B in memory, :func:`add_at_b` is exactly
``c += a.T @ b``. (GEMM's output must not alias its inputs - BLAS reads A and B while it writes C;
NumPy's expression computes the product first. A gradient that shares memory with the layer's
input gave silently wrong sums through the GEMM: attack5.) The same GEMM
either way, so the results agree to rounding (one fused accumulation instead of a rounded product
then a rounded sum); ``tests/test_nn.py`` compares both.
"""
from __future__ import annotations

import ctypes
import glob
import os

import numpy as np

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


def _load() -> dict:
    """{dtype: cblas_?gemm with 64-bit integers} from NumPy's bundled OpenBLAS, or {}."""
    libs = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs",
                                         "libscipy_openblas64_*.so")))
    if not libs:
        return {}
    try:
        lib = ctypes.CDLL(libs[0])
    except OSError:
        return {}
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    out = {}
    for dtype, letter, real in ((np.float32, "s", ctypes.c_float), (np.float64, "d", ctypes.c_double)):
        fn = getattr(lib, f"scipy_cblas_{letter}gemm64_", None)
        if fn is None:
            return {}
        fn.restype = None  # ctypes releases the GIL for the call, as NumPy's own matmul does
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, i64, i64, real, ptr, i64, ptr, i64, real,
                       ptr, i64]
        out[np.dtype(dtype)] = fn
    return out


_GEMM = _load()
AVAILABLE = bool(_GEMM)


def add_at_b(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """c += a.T @ b, in place, for 2-D a (k, m), b (k, n), c (m, n).

    Example:
        >>> add_at_b(weight.grad, x2, dy2)   # dW += x^T dy
    """
    fn = _GEMM.get(c.dtype)
    k, m = a.shape
    n = b.shape[1]
    if (fn is None or a.dtype != c.dtype or b.dtype != c.dtype or not c.flags.c_contiguous
            or not a.flags.c_contiguous or not b.flags.c_contiguous or not c.flags.writeable
            or c.shape != (m, n) or b.shape[0] != k or min(k, m, n) == 0
            or np.may_share_memory(c, a) or np.may_share_memory(c, b)):
        c += a.T @ b
        return
    fn(_ROW_MAJOR, _TRANS, _NO_TRANS, m, n, k, 1.0, a.ctypes.data, m, b.ctypes.data, n, 1.0, c.ctypes.data, n)
