"""GNMT-lite: a small GNMT-style sequence-to-sequence model (Wu et al. 2016, "Google's Neural
Machine Translation System") on disttrain's fused numba LSTM.

    source ids -> embedding -> stacked LSTM encoder (lengths-aware: padding carries the state)
    target ids (teacher forcing: BOS + target[:-1]) -> embedding -> stacked LSTM decoder, layer i
        starting from encoder layer i's final state
    Luong attention of the top decoder states over the encoder states (padding masked)
    tanh(W_c [decoder state; context]) -> vocabulary logits -> softmax cross-entropy ignoring PAD

Kept from GNMT: embeddings, stacked LSTMs, attention over encoder states, per-token softmax,
padding ignored by the loss. Left out to stay small: the bidirectional bottom encoder layer,
residual connections between layers, input feeding, beam search and wordpieces.

forward((src, src_len, tgt_in)) -> logits (B, T, V); backward(dlogits) -> None. Backward reports
each sub-module's gradients ready as soon as they are final (output layer first, source embedding
last), so DataParallel's buckets start their allreduce during backward.
"""
from __future__ import annotations

import numpy as np

from disttrain.nn import LSTM, Attention, Embedding, Linear, Module


class GNMT(Module):
    """Args: vocab size, embedding size, hidden size, LSTM layers per side, seed, dtype."""

    def __init__(self, vocab: int, emb: int = 64, hidden: int = 128, layers: int = 2, seed: int = 0,
                 dtype=np.float32):
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        rng = np.random.default_rng(seed)
        self.src_emb = Embedding(vocab, emb, padding_idx=0, rng=rng, dtype=dtype)
        tgt_emb = Embedding(vocab, emb, padding_idx=0, rng=rng, dtype=dtype)
        for e in (self.src_emb, tgt_emb):  # N(0, 1) rows would saturate the first gates
            e.weight.data *= 0.1
        self.encoder = [LSTM(emb if i == 0 else hidden, hidden, rng=rng, dtype=dtype) for i in range(layers)]
        # Registered after the encoder: parameters in reverse registration order are then in the
        # order backward finishes them, so DataParallel's buckets fill (and launch) one by one.
        self.tgt_emb = tgt_emb
        self.decoder = [LSTM(emb if i == 0 else hidden, hidden, rng=rng, dtype=dtype) for i in range(layers)]
        self.attention = Attention(hidden, hidden, rng=rng, dtype=dtype)
        self.combine = Linear(2 * hidden, hidden, init="xavier", rng=rng, dtype=dtype)
        self.out = Linear(hidden, vocab, init="xavier", rng=rng, dtype=dtype)
        self.hidden = hidden

    def forward(self, batch):
        src, src_len, tgt_in = batch
        x = self.src_emb.forward(src)
        states = []
        for lstm in self.encoder:
            x = lstm.forward(x, lengths=src_len)
            states.append(lstm.state)
        y = self.tgt_emb.forward(tgt_in)
        for lstm, (h, c) in zip(self.decoder, states):
            y = lstm.forward(y, h0=h, c0=c)
        ctx = self.attention.forward(y, x, src_len)
        self._t = np.tanh(self.combine.forward(np.concatenate([y, ctx], axis=-1)))
        return self.out.forward(self._t)

    def backward(self, dlogits):
        H = self.hidden
        dt_ = self.out.backward(dlogits)
        self._grads_ready(self.out)
        dcat = self.combine.backward(dt_ * (1 - self._t * self._t))  # d tanh = 1 - tanh^2
        self._grads_ready(self.combine)
        dy, dctx = dcat[..., :H], dcat[..., H:]
        dy = dy + self.attention.backward(dctx)
        self._grads_ready(self.attention)
        denc = self.attention.dk
        dstates = []
        for lstm in reversed(self.decoder):
            dy = lstm.backward(dy)
            dstates.append(lstm.dstate)
            self._grads_ready(lstm)
        self.tgt_emb.backward(dy)
        self._grads_ready(self.tgt_emb)
        dx = denc
        for lstm, (dh, dc) in zip(reversed(self.encoder), dstates):  # decoder layer i started from encoder layer i
            dx = lstm.backward(dx, dh_n=dh, dc_n=dc)
            self._grads_ready(lstm)
        self.src_emb.backward(dx)
        self._grads_ready(self.src_emb)
        return None
