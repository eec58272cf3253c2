"""Row-sparse gradients: the rows of a table a step touched, and their gradient rows.

An embedding lookup touches a few rows of a huge table, so its dense gradient is almost all zeros,
and a dense optimizer step sweeps every row of the table (weights, gradient, state) to change a
few - in DLRM that sweep dominates the step (Naumov et al. 2019; Mudigere et al. 2022 update
only the looked-up rows, as TensorFlow's IndexedSlices and PyTorch's ``sparse=True`` embeddings
do). A layer that opts in (``sparse=True``) makes its parameter's ``.grad`` a ``RowSparseGrad``;
the optimizers that accept it (``Optimizer.sparse``) update only those rows.

The rows are kept sorted and de-duplicated (``coalesce``), so an optimizer touches each row once,
and the sum over the occurrences of a row is taken in the order they arrived - the order a dense
scatter-add into a zero gradient would use, so both give the same bits.
"""
from __future__ import annotations

import numpy as np

from . import kernels as K


def coalesce(rows: np.ndarray, values: np.ndarray) -> tuple:
    """(sorted unique rows, each one's summed values) of possibly repeated (rows, values).

    Args:
        rows: (k,) integer row numbers, in any order, repeats allowed.
        values: (k, ...) gradient rows.

    Returns:
        (rows (u,) int64 sorted unique, values (u, ...)): occurrences summed in arrival order.

    Example:
        >>> coalesce(np.array([3, 1, 3]), np.array([[1.0], [2.0], [4.0]]))
        (array([1, 3]), array([[2.], [5.]]))
    """
    rows = np.asarray(rows, np.int64)
    uniq, inv = np.unique(rows, return_inverse=True)
    flat = np.ascontiguousarray(values).reshape(rows.shape[0], int(np.prod(values.shape[1:], dtype=np.int64)))
    out = np.zeros((uniq.shape[0], flat.shape[1]), flat.dtype)
    K.embedding_bwd(inv.reshape(-1).astype(np.int64, copy=False), flat, out, -1)  # the scatter-add kernel
    return uniq, out.reshape((uniq.shape[0],) + values.shape[1:])


class RowSparseGrad:
    """The gradient of a (rows, ...) parameter as its touched rows and their gradient rows.

    Layers accumulate into it with ``add_`` (as they would ``+=`` into a dense gradient: several
    backward passes before a step sum up). ``g[...] = 0`` clears it, so the usual
    ``zero_grad`` code works unchanged and costs nothing per untouched row.

    Attributes:
        shape, dtype: those of the dense gradient it stands for (the parameter's).
        rows: (k,) int64, sorted and unique: the rows touched since the last clear.
        values: (k, ...) their gradient rows.

    Example:
        >>> g = RowSparseGrad((5, 2), np.float64)
        >>> g.add_(np.array([4, 1, 4]), np.ones((3, 2)))
        >>> g.rows, g.values[:, 0]
        (array([1, 4]), array([1., 2.]))
    """

    __slots__ = ("shape", "dtype", "rows", "values")

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        self[...] = 0

    @property
    def nnz_rows(self) -> int:
        return int(self.rows.shape[0])

    def add_(self, rows, values) -> None:
        """Accumulate gradient `values` (k, ...) of `rows` (k,), repeats allowed."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        values = np.asarray(values, self.dtype)
        if values.shape != rows.shape + self.shape[1:]:
            raise ValueError(f"row-sparse gradient of shape {self.shape}: values for {rows.shape[0]} rows must "
                             f"have shape {rows.shape + self.shape[1:]}, got {values.shape}")
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"rows must lie in [0, {self.shape[0]}), got [{rows.min()}, {rows.max()}]")
        if self.rows.size:  # existing rows first: the order a dense "+=" would sum in
            rows, values = np.concatenate([self.rows, rows]), np.concatenate([self.values, values])
        self.rows, self.values = coalesce(rows, values)

    def __setitem__(self, key, value) -> None:
        if key is not Ellipsis or not np.isscalar(value) or value != 0:
            raise TypeError("a row-sparse gradient can only be cleared (g[...] = 0) or accumulated (add_)")
        self.rows = np.zeros(0, np.int64)
        self.values = np.zeros((0,) + self.shape[1:], self.dtype)

    def to_dense(self) -> np.ndarray:
        """The dense gradient (tests, debugging: it allocates the whole parameter's shape)."""
        out = np.zeros(self.shape, self.dtype)
        out[self.rows] = self.values
        return out

    def __repr__(self) -> str:
        return f"RowSparseGrad(shape={self.shape}, dtype={self.dtype}, rows={self.nnz_rows})"
