"""Embedding lookup with an optional padding index whose row stays zero and gets no gradient."""
from __future__ import annotations

import numpy as np

from . import kernels as K
from .module import Module, Parameter


class Embedding(Module):
    def __init__(self, num_embeddings: int, dim: int, padding_idx: int | None = None, rng=None,
                 dtype=np.float32):
        rng = rng if rng is not None else np.random.default_rng(0)
        w = rng.standard_normal((num_embeddings, dim)).astype(dtype)
        if padding_idx is not None:
            w[padding_idx] = 0
        self.weight = Parameter(w)
        self.padding_idx = -1 if padding_idx is None else padding_idx

    def forward(self, ids):
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.weight.data.shape[0]):
            raise IndexError(f"Embedding ids must lie in [0, {self.weight.data.shape[0]})")
        self._ids = ids
        return self.weight.data[ids]

    def backward(self, dy):
        ids = self._ids.reshape(-1).astype(np.int64)
        K.embedding_bwd(ids, np.ascontiguousarray(dy).reshape(ids.shape[0], -1), self.weight.grad, self.padding_idx)
        return None  # ids have no gradient
