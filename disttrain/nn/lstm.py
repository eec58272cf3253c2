"""LSTM layer with fused gate GEMMs (Hochreiter & Schmidhuber 1997; the fusion follows Intel's
"LSTM on Xeon" optimisation: the input projection of *all* time steps and all four gates is one
GEMM, each step's recurrent projection of all four gates is one GEMM, and the gate math is one
numba kernel). Backward needs only three more big GEMMs over all time steps (dW_x, dW_h, dx) plus
one small recurrent GEMM per step.
"""
from __future__ import annotations

import math

import numpy as np

from . import kernels as K
from .module import Module, Parameter


class LSTM(Module):
    """One LSTM layer over batch-first sequences.

    Args:
        input_size, hidden_size: feature sizes I and H.
        forget_bias: initial forget-gate bias (1.0: Jozefowicz et al. 2015, keeps early gradients).
        rng, dtype: as for Linear.

    forward(x, h0=None, c0=None, lengths=None) -> y
        x (B, T, I); y (B, T, H) is the hidden state after every step. ``lengths`` (B,) marks
        right-padded sequences: past a row's length its state is carried unchanged, so ``state``
        holds each row's state after its last real token. Final (h, c) are left in ``self.state``.
    backward(dy, dh_n=None, dc_n=None) -> dx
        Accumulates parameter grads; the grads w.r.t. (h0, c0) are left in ``self.dstate``.

    Example:
        >>> lstm = LSTM(8, 16)
        >>> y = lstm.forward(np.zeros((4, 5, 8), np.float32))   # (4, 5, 16)
    """

    def __init__(self, input_size: int, hidden_size: int, forget_bias: float = 1.0, rng=None,
                 dtype=np.float32):
        rng = rng if rng is not None else np.random.default_rng(0)
        b = 1.0 / math.sqrt(hidden_size)  # the usual U(-1/sqrt(H), 1/sqrt(H)) for recurrent nets
        self.w_x = Parameter(rng.uniform(-b, b, (input_size, 4 * hidden_size)).astype(dtype))
        self.w_h = Parameter(rng.uniform(-b, b, (hidden_size, 4 * hidden_size)).astype(dtype))
        bias = np.zeros(4 * hidden_size, dtype)
        bias[hidden_size:2 * hidden_size] = forget_bias
        self.bias = Parameter(bias)
        self.hidden_size = hidden_size
        self.state = self.dstate = None

    def forward(self, x, h0=None, c0=None, lengths=None):
        n_b, n_t, n_i = x.shape
        n_h, dt = self.hidden_size, self.w_x.data.dtype
        if n_i != self.w_x.data.shape[0]:
            raise ValueError(f"LSTM expects input size {self.w_x.data.shape[0]}, got {n_i}")
        xt = np.ascontiguousarray(x.transpose(1, 0, 2), dtype=dt)  # time-major: each step contiguous
        # One GEMM for the input projection of every step and every gate.
        gates = (xt.reshape(n_t * n_b, n_i) @ self.w_x.data).reshape(n_t, n_b, 4 * n_h)
        gates += self.bias.data
        hs = np.empty((n_t + 1, n_b, n_h), dt)
        cs = np.empty((n_t + 1, n_b, n_h), dt)
        hs[0] = 0 if h0 is None else h0
        cs[0] = 0 if c0 is None else c0
        tc = np.empty((n_t, n_b, n_h), dt)
        mask = self._mask(lengths, n_b, n_t)
        for t in range(n_t):
            gates[t] += hs[t] @ self.w_h.data  # one GEMM for all four recurrent projections
            K.lstm_cell_fwd(gates[t], cs[t], hs[t], mask[t], cs[t + 1], hs[t + 1], tc[t])
        self._cache = (xt, gates, hs, cs, tc, mask)
        self.state = (hs[n_t].copy(), cs[n_t].copy())
        return hs[1:].transpose(1, 0, 2)

    @staticmethod
    def _mask(lengths, n_b, n_t):
        if lengths is None:
            return np.ones((n_t, n_b), np.uint8)
        lengths = np.asarray(lengths)
        if lengths.shape != (n_b,) or lengths.min(initial=0) < 0 or lengths.max(initial=0) > n_t:
            raise ValueError(f"lengths must be ({n_b},) values in [0, {n_t}]")
        return (np.arange(n_t)[:, None] < lengths[None, :]).astype(np.uint8)

    def backward(self, dy, dh_n=None, dc_n=None):
        xt, acts, hs, cs, tc, mask = self._cache
        n_t, n_b, n_h = tc.shape
        dt = hs.dtype
        dyt = dy.transpose(1, 0, 2)
        dh = np.zeros((n_b, n_h), dt) if dh_n is None else np.array(dh_n, dt)
        dc = np.zeros((n_b, n_h), dt) if dc_n is None else np.array(dc_n, dt)
        dgates = np.empty_like(acts)
        w_h_t = np.ascontiguousarray(self.w_h.data.T)
        for t in range(n_t - 1, -1, -1):
            dh += dyt[t]
            K.lstm_cell_bwd(acts[t], cs[t], tc[t], mask[t], dh, dc, dgates[t])
            pad = mask[t] == 0
            carried = dh[pad] if pad.any() else None
            dh = dgates[t] @ w_h_t
            if carried is not None:
                dh[pad] += carried  # a padded step passed h through unchanged
        self.dstate = (dh, dc)
        # Parameter and input grads: three GEMMs over all steps at once.
        dg2 = dgates.reshape(n_t * n_b, 4 * n_h)
        self.w_x.grad += xt.reshape(n_t * n_b, xt.shape[-1]).T @ dg2  # explicit width: zero rows
        self.w_h.grad += hs[:-1].reshape(n_t * n_b, n_h).T @ dg2
        self.bias.grad += dg2.sum(axis=0)
        return (dg2 @ self.w_x.data.T).reshape(n_t, n_b, xt.shape[-1]).transpose(1, 0, 2)
