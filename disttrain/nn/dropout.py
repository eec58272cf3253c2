"""Inverted dropout: zero each activation with probability p in training, scale the rest by 1/(1-p)."""
from __future__ import annotations

import numpy as np

from . import kernels as K
from .module import Module


class Dropout(Module):
    """Args:
        p: drop probability in [0, 1).
        rng: a NumPy Generator; give each rank its own stream (e.g. seeded with the rank) so that
            data-parallel replicas drop different units of different samples.
    """

    def __init__(self, p: float = 0.5, rng=None):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout p must be in [0, 1), got {p}")
        self.p = p
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self._mask = None

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self._mask = None
            return x
        x = np.ascontiguousarray(x)
        keep = (self.rng.random(x.shape) >= self.p).astype(x.dtype) / x.dtype.type(1.0 - self.p)
        self._mask = keep
        y = np.empty_like(x)
        K.mul(x.reshape(-1), keep.reshape(-1), y.reshape(-1))
        return y

    def backward(self, dy):
        if self._mask is None:
            return dy
        dx = np.empty_like(dy)
        K.mul(np.ascontiguousarray(dy).reshape(-1), self._mask.reshape(-1), dx.reshape(-1))
        return dx
