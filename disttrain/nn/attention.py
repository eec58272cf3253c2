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
