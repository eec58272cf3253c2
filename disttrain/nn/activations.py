"""Element-wise activations; the work runs in numba kernels on flat views."""
from __future__ import annotations

import numpy as np

from . import kernels as K
from .module import Module


class _Elementwise(Module):
    """y = f(x); backward needs x (ReLU, GELU) or y (Tanh, Sigmoid), per `_keep`."""

    _fwd = _bwd = None
    _keep = "x"

    def forward(self, x):
        x = np.ascontiguousarray(x)
        y = np.empty_like(x)
        type(self)._fwd(x.reshape(-1), y.reshape(-1))
        self._saved = x if self._keep == "x" else y
        return y

    def backward(self, dy):
        dy = np.ascontiguousarray(dy)
        dx = np.empty_like(dy)
        type(self)._bwd(self._saved.reshape(-1), dy.reshape(-1), dx.reshape(-1))
        return dx


class ReLU(_Elementwise):
    _fwd, _bwd = K.relu_fwd, K.relu_bwd


class GELU(_Elementwise):
    """GELU, tanh approximation."""

    _fwd, _bwd = K.gelu_fwd, K.gelu_bwd


class Tanh(_Elementwise):
    _fwd, _bwd, _keep = K.tanh_fwd, K.tanh_bwd, "y"


class Sigmoid(_Elementwise):
    _fwd, _bwd, _keep = K.sigmoid_fwd, K.sigmoid_bwd, "y"
