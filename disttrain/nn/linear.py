"""Fully connected layer: y = x @ W + b (W is (in, out), so both GEMMs are plain BLAS calls)."""
from __future__ import annotations

import math

import numpy as np

from .blas import add_at_b
from .init import kaiming_uniform, xavier_uniform
from .module import Module, Parameter


def affine_forward(x, weight, bias):
    """y = x @ W (+ b): one BLAS GEMM over all leading dimensions."""
    y = x @ weight.data
    if bias is not None:
        y += bias.data
    return y


def affine_backward(x, dy, weight, bias, input_grad: bool = True):
    """Accumulate dW = x^T dy and db = sum dy (leading dimensions flattened) into the parameters'
    .grad; return dx = dy W^T, or None when the input needs no gradient. Shared by Linear and the
    tensor-parallel linears (parallel/tensor.py), which only add their communication around it."""
    affine_weight_grad(x, dy, weight, bias)
    return dy @ weight.data.T if input_grad else None


def affine_weight_grad(x, dy, weight, bias) -> None:
    """W of an affine layer: dW += x^T dy, db += sum dy (leading dimensions flattened)."""
    rows = math.prod(x.shape[:-1])  # not reshape(-1, ...): ambiguous when a size is zero
    x2, dy2 = x.reshape(rows, x.shape[-1]), dy.reshape(rows, dy.shape[-1])
    add_at_b(weight.grad, x2, dy2)  # one GEMM that accumulates: no temporary (blas.py)
    if bias is not None:
        bias.grad += dy2.sum(axis=0)


class Linear(Module):
    """Args:
        in_features, out_features: sizes of the last dimension.
        bias: add a learned bias.
        init: "kaiming" (for ReLU-family activations) or "xavier" (tanh / sigmoid / output layers).
        rng: a NumPy Generator (default: seeded 0, so every rank builds the same model).
        dtype: float32 (default) or float64.
        input_grad: compute the gradient w.r.t. the input in backward. A first layer fed with data
            needs none; skipping it saves one of the three GEMMs (as autograd does for inputs
            that do not require grad). backward then returns None.
    """

    weight_state = ("_x", "_dy")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init: str = "kaiming",
                 rng=None, dtype=np.float32, input_grad: bool = True):
        rng = rng if rng is not None else np.random.default_rng(0)
        shape = (in_features, out_features)
        w = (kaiming_uniform(rng, in_features, shape, dtype) if init == "kaiming"
             else xavier_uniform(rng, in_features, out_features, shape, dtype))
        self.weight = Parameter(w)
        self.bias = Parameter(np.zeros(out_features, dtype)) if bias else None
        self._x = self._dy = None  # _dy: kept by backward_input for backward_weight
        self.input_grad = input_grad

    def forward(self, x):
        self._x = x
        return affine_forward(x, self.weight, self.bias)

    def backward(self, dy):
        return affine_backward(self._x, dy, self.weight, self.bias, self.input_grad)

    def backward_input(self, dy):
        """B: dx = dy W^T now; dW and db wait for ``backward_weight`` (which keeps x and dy)."""
        self._dy = dy
        return dy @ self.weight.data.T if self.input_grad else None

    def backward_weight(self) -> None:
        """W: dW += x^T dy, db += sum dy for the last ``backward_input``."""
        dy, self._dy = self._dy, None
        if dy is not None:
            affine_weight_grad(self._x, dy, self.weight, self.bias)
