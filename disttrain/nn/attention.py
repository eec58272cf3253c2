"""Luong ("general") attention for sequence-to-sequence models (Luong, Pham & Manning 2015,
"Effective Approaches to Attention-based Neural Machine Translation"; GNMT, Wu et al. 2016, uses
the same attend-over-encoder-states structure).

    scores[b, t, s] = q[b, t] . (W k[b, s])        masked where s >= length[b]
    a = softmax_s(scores);  context[b, t] = sum_s a[b, t, s] k[b, s]

The keys double as values (the encoder states). Batched GEMMs through NumPy; the masked softmax
and its backward are plain NumPy on (B, T, S), small next to the GEMMs.
"""
from __future__ import annotations

import math

import numpy as np

from .linear import Linear
from .module import Module, Parameter


class Attention(Module):
    """Attention of queries (B, T, Hq) over keys/values (B, S, Hk).

    forward(q, k, lengths=None) -> context (B, T, Hk); ``self.weights`` keeps a (B, T, S).
    backward(dcontext) -> dq; the gradient w.r.t. k is left in ``self.dk``.
    """

    def __init__(self, query_size: int, key_size: int, rng=None, dtype=np.float32):
        rng = rng if rng is not None else np.random.default_rng(0)
        b = 1.0 / math.sqrt(key_size)
        self.w = Parameter(rng.uniform(-b, b, (query_size, key_size)).astype(dtype))
        self.weights = self.dk = None

    def forward(self, q, k, lengths=None):
        qa = q @ self.w.data  # (B, T, Hk)
        scores = qa @ k.transpose(0, 2, 1)  # (B, T, S)
        if lengths is not None:
            pad = np.arange(k.shape[1])[None, :] >= np.asarray(lengths)[:, None]  # (B, S)
            scores = np.where(pad[:, None, :], -np.inf, scores)
        m = scores.max(axis=2, keepdims=True)
        m = np.where(np.isfinite(m), m, 0)  # a row with no key at all (length 0) attends to nothing
        e = np.exp(scores - m)
        z = e.sum(axis=2, keepdims=True)
        a = e / np.where(z > 0, z, 1)
        self._cache = (q, k, qa, a)
        self.weights = a
        return a @ k

    def backward(self, dctx):
        q, k, qa, a = self._cache
        da = dctx @ k.transpose(0, 2, 1)  # (B, T, S)
        dk = a.transpose(0, 2, 1) @ dctx  # through the values
        ds = a * (da - (da * a).sum(axis=2, keepdims=True))  # softmax backward; masked entries: a = 0
        dqa = ds @ k
        dk += ds.transpose(0, 2, 1) @ qa  # through the keys
        self.w.grad += np.einsum("btq,btk->qk", q, dqa, optimize=True)
        self.dk = dk
        return dqa @ self.w.data.T


class MultiHeadAttention(Module):
    """Multi-head scaled dot-product self-attention (Vaswani et al. 2017), x (B, S, d) -> (B, S, d).

        [q | k | v] = x W_qkv + b      (one GEMM; columns laid out head by head: h0 q k v, h1 q k v, ...)
        a = softmax(q k^T / sqrt(d_head) [+ causal mask]);  ctx = a v;  y = merge_heads(ctx) W_o + b_o

    The head-major column layout is Megatron-LM's: a contiguous block of W_qkv's columns (and of
    W_o's rows) holds whole heads, so ``parallel.tensor.ParallelAttention`` splits the heads over a
    tensor-parallel group by slicing the same weights. Attention weights are plain NumPy batched
    GEMMs on (B, heads, S, S) - fine for the short sequences of the model zoo.
    """

    def __init__(self, d: int, heads: int, causal: bool = True, rng=None, dtype=np.float32,
                 input_grad: bool = True):
        if heads < 1 or d % heads:
            raise ValueError(f"MultiHeadAttention: d={d} is not divisible by heads={heads}")
        rng = rng if rng is not None else np.random.default_rng(0)
        self.d, self.heads, self.local_heads, self.causal = d, heads, heads, causal
        self.qkv = Linear(d, 3 * d, init="xavier", rng=rng, dtype=dtype, input_grad=input_grad)
        self.proj = Linear(d, d, init="xavier", rng=rng, dtype=dtype)

    def forward(self, x):
        B, S, _ = x.shape
        h, dh = self.local_heads, self.d // self.heads
        qkv = self.qkv.forward(x).reshape(B, S, h, 3, dh).transpose(3, 0, 2, 1, 4)  # (3, B, h, S, dh)
        q, k, v = qkv[0], qkv[1], qkv[2]
        s = (q @ k.transpose(0, 1, 3, 2)) * q.dtype.type(1 / math.sqrt(dh))  # (B, h, S, S)
        if self.causal:
            s = np.where(np.triu(np.ones((S, S), bool), 1), -np.inf, s)
        s -= s.max(axis=-1, keepdims=True)
        a = np.exp(s)
        a /= a.sum(axis=-1, keepdims=True)
        ctx = (a @ v).transpose(0, 2, 1, 3).reshape(B, S, h * dh)
        self._cache = (q, k, v, a)
        return self.proj.forward(ctx)

    def backward(self, dy):
        return self._backward(dy, split=False)

    def backward_input(self, dy):
        """B: the input gradient; the projections' weight gradients wait for backward_weight."""
        return self._backward(dy, split=True)

    def backward_weight(self) -> None:
        for lin in (self.proj, self.qkv):
            lin.backward_weight()
            self._grads_ready(lin)

    def _backward(self, dy, split: bool):
        q, k, v, a = self._cache
        B, h, S, dh = q.shape
        dctx = (self.proj.backward_input(dy) if split else self.proj.backward(dy))
        dctx = dctx.reshape(B, S, h, dh).transpose(0, 2, 1, 3)
        if not split:
            self._grads_ready(self.proj)
        da = dctx @ v.transpose(0, 1, 3, 2)
        dv = a.transpose(0, 1, 3, 2) @ dctx
        ds = a * (da - (da * a).sum(axis=-1, keepdims=True))  # softmax backward; masked: a = 0
        ds *= ds.dtype.type(1 / math.sqrt(dh))
        dq, dk = ds @ k, ds.transpose(0, 1, 3, 2) @ q
        dqkv = np.stack([dq, dk, dv]).transpose(1, 3, 2, 0, 4).reshape(B, S, 3 * h * dh)
        if split:
            return self.qkv.backward_input(dqkv)
        dx = self.qkv.backward(dqkv)
        self._grads_ready(self.qkv)
        return dx
