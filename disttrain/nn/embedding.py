"""Embedding lookup with an optional padding index whose row stays zero and gets no gradient."""
from __future__ import annotations

import operator

import numpy as np

from . import kernels as K
from .module import Module, Parameter


class Embedding(Module):
    """A table of `num_embeddings` rows of size `dim`; forward(ids) returns the rows of ids.

    Args:
        num_embeddings, dim: the table's shape.
        padding_idx: a row that stays zero and never receives a gradient (padding tokens), or None.
            Negative values count from the end, like PyTorch's: -1 is the last row.
        rng, dtype: initialisation (standard normal) and the table's dtype.

    Attributes:
        padding_idx: the padding row, normalised to [0, num_embeddings), or None.
    """

    def __init__(self, num_embeddings: int, dim: int, padding_idx: int | None = None, rng=None,
                 dtype=np.float32):
        self.padding_idx = _padding_row(padding_idx, num_embeddings)
        rng = rng if rng is not None else np.random.default_rng(0)
        w = rng.standard_normal((num_embeddings, dim)).astype(dtype)
        if self.padding_idx is not None:
            w[self.padding_idx] = 0
        self.weight = Parameter(w)

    def forward(self, ids):
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.weight.data.shape[0]):
            raise IndexError(f"Embedding ids must lie in [0, {self.weight.data.shape[0]})")
        self._ids = ids
        return self.weight.data[ids]

    def backward(self, dy):
        ids = self._ids.reshape(-1).astype(np.int64)
        # The kernel skips rows equal to its padding argument; -1 matches no id (ids are >= 0).
        # That is why padding_idx must be normalised: a raw -1 used to mean "no padding" here
        # while __init__ zeroed row -1, so the zeroed row kept being updated.
        pad = -1 if self.padding_idx is None else self.padding_idx
        K.embedding_bwd(ids, np.ascontiguousarray(dy).reshape(ids.shape[0], self.weight.grad.shape[1]), self.weight.grad, pad)
        return None  # ids have no gradient


def _padding_row(padding_idx, n: int):
    """padding_idx in [0, n) (negative counts from the end, as in PyTorch), or None; a clear
    error for anything out of range or not an integer."""
    if padding_idx is None:
        return None
    try:
        idx = operator.index(padding_idx)
    except TypeError:
        raise TypeError(f"Embedding padding_idx must be an int or None, got {padding_idx!r}") from None
    if not -n <= idx < n:
        raise ValueError(f"Embedding padding_idx {idx} is out of range for {n} embeddings: "
                         f"use a value in [{-n}, {n}) or None")
    return idx + n if idx < 0 else idx
