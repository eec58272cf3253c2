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

The model is a Sequential of pipeline units (``blocks()``), each taking and returning a tuple of
arrays (the multi-tensor activations of parallel/pipeline/activations.py) that carries what later
units need - GNMT's own model-parallel cut, one layer per device, made explicit:

    (src, src_len, tgt_in)                         -> SourceEmbedding
    (x, src_len, tgt_in, h_0, c_0, ..., h_i, c_i)  -> EncoderLayer i appends its final state
    (enc, src_len, y, h_0, c_0, ...)               -> TargetEmbedding replaces tgt_in by y
    (enc, src_len, y', h_i+1, c_i+1, ...)          -> DecoderLayer i consumes state i
    (enc, src_len, y)                              -> AttentionOutput -> logits

Gradients have the same form (None for the integer parts). forward((src, src_len, tgt_in)) ->
logits (B, T, V); backward(dlogits) -> None, each unit's gradients reported ready as soon as they
are final (output layer first, source embedding last), so DataParallel's buckets start early.
"""
from __future__ import annotations

import numpy as np

from disttrain.nn import LSTM, Attention, Embedding, Linear, Module, Sequential
from disttrain.parallel.vocab import VocabParallelLinear


class SourceEmbedding(Module):
    """(src, src_len, tgt_in) -> (embedded src, src_len, tgt_in)."""

    def __init__(self, emb: Embedding):
        self.emb = emb

    def forward(self, batch):
        src, src_len, tgt_in = batch
        return self.emb.forward(src), src_len, tgt_in

    def backward(self, d):
        self.emb.backward(d[0])
        return None  # ids have no gradient


class EncoderLayer(Module):
    """(x, src_len, tgt_in, *states) -> (lstm(x), src_len, tgt_in, *states, h, c)."""

    def __init__(self, lstm: LSTM):
        self.lstm = lstm

    def forward(self, a):
        x, src_len, tgt_in, *states = a
        return (self.lstm.forward(x, lengths=src_len), src_len, tgt_in, *states, *self.lstm.state)

    def backward(self, d):
        dy, _, _, *dstates = d
        dx = self.lstm.backward(dy, dh_n=dstates[-2], dc_n=dstates[-1])
        return (dx, None, None, *dstates[:-2])


class TargetEmbedding(Module):
    """(enc, src_len, tgt_in, *states) -> (enc, src_len, embedded tgt_in, *states)."""

    def __init__(self, emb: Embedding):
        self.emb = emb

    def forward(self, a):
        enc, src_len, tgt_in, *states = a
        return (enc, src_len, self.emb.forward(tgt_in), *states)

    def backward(self, d):
        denc, _, dy, *dstates = d
        self.emb.backward(dy)
        return (denc, None, None, *dstates)


class DecoderLayer(Module):
    """(enc, src_len, y, h, c, *rest) -> (enc, src_len, lstm(y from state (h, c)), *rest)."""

    def __init__(self, lstm: LSTM):
        self.lstm = lstm

    def forward(self, a):
        enc, src_len, y, h, c, *rest = a
        return (enc, src_len, self.lstm.forward(y, h0=h, c0=c), *rest)

    def backward(self, d):
        denc, _, dy, *drest = d
        dx = self.lstm.backward(dy)
        return (denc, None, dx, *self.lstm.dstate, *drest)


class AttentionOutput(Module):
    """(enc, src_len, y) -> logits: Luong attention of y over enc, tanh(W_c [y; context]), output layer."""

    def __init__(self, attention: Attention, combine: Linear, out: Linear, hidden: int):
        self.attention, self.combine, self.out, self.hidden = attention, combine, out, hidden

    def forward(self, a):
        enc, src_len, y = a
        ctx = self.attention.forward(y, enc, src_len)
        self._t = np.tanh(self.combine.forward(np.concatenate([y, ctx], axis=-1)))
        return self.out.forward(self._t)

    def backward(self, dlogits):
        H = self.hidden
        dt_ = self.out.backward(dlogits)
        self._grads_ready(self.out)
        dcat = self.combine.backward(dt_ * (1 - self._t * self._t))  # d tanh = 1 - tanh^2
        self._grads_ready(self.combine)
        dy = dcat[..., :H] + self.attention.backward(dcat[..., H:])
        self._grads_ready(self.attention)
        return self.attention.dk, None, dy


class GNMT(Sequential):
    """Args: vocab size, embedding size, hidden size, LSTM layers per side, seed, dtype, tp_group
    (the output layer split by vocabulary over it - train with ``VocabParallelCrossEntropy``; the
    rest is replicated over the group)."""

    def __init__(self, vocab: int, emb: int = 64, hidden: int = 128, layers: int = 2, seed: int = 0,
                 dtype=np.float32, tp_group=None):
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        rng = np.random.default_rng(seed)
        src_emb = Embedding(vocab, emb, padding_idx=0, rng=rng, dtype=dtype)
        tgt_emb = Embedding(vocab, emb, padding_idx=0, rng=rng, dtype=dtype)
        for e in (src_emb, tgt_emb):  # N(0, 1) rows would saturate the first gates
            e.weight.data *= 0.1
        encoder = [LSTM(emb if i == 0 else hidden, hidden, rng=rng, dtype=dtype) for i in range(layers)]
        decoder = [LSTM(emb if i == 0 else hidden, hidden, rng=rng, dtype=dtype) for i in range(layers)]
        head = AttentionOutput(Attention(hidden, hidden, rng=rng, dtype=dtype),
                               Linear(2 * hidden, hidden, init="xavier", rng=rng, dtype=dtype),
                               Linear(hidden, vocab, init="xavier", rng=rng, dtype=dtype) if tp_group is None else
                               VocabParallelLinear(hidden, vocab, tp_group, init="xavier", rng=rng, dtype=dtype),
                               hidden)
        # In forward order: parameters in reverse registration order are then in the order backward
        # finishes them, so DataParallel's buckets fill (and launch) one by one.
        super().__init__(SourceEmbedding(src_emb), *map(EncoderLayer, encoder), TargetEmbedding(tgt_emb),
                         *map(DecoderLayer, decoder), head)
        self.hidden = hidden

    def blocks(self) -> list:
        """The pipeline units, in order (see the module docstring for what each passes on)."""
        return list(self.layers)
