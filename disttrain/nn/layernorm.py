"""Layer normalisation over the last dimension (Ba, Kiros & Hinton 2016), fused in numba."""
from __future__ import annotations

import numpy as np

from . import kernels as K
from .module import Module, Parameter


class LayerNorm(Module):
    def __init__(self, dim: int, eps: float = 1e-5, dtype=np.float32):
        self.weight = Parameter(np.ones(dim, dtype))
        self.bias = Parameter(np.zeros(dim, dtype))
        self.eps = eps

    def forward(self, x):
        x = np.ascontiguousarray(x)
        x2 = x.reshape(-1, x.shape[-1])
        y = np.empty_like(x2)
        self._xhat = np.empty_like(x2)
        self._rstd = np.empty(x2.shape[0], x.dtype)
        K.layernorm_fwd(x2, self.weight.data, self.bias.data, self.eps, y, self._xhat, self._rstd)
        return y.reshape(x.shape)

    def backward(self, dy):
        dy2 = np.ascontiguousarray(dy).reshape(self._xhat.shape)
        dx = np.empty_like(dy2)
        K.layernorm_bwd(dy2, self._xhat, self._rstd, self.weight.data, dx, self.weight.grad, self.bias.grad)
        return dx.reshape(dy.shape)
