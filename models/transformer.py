"""A small decoder-only transformer language model (GPT-style, pre-LayerNorm blocks), built from
disttrain.nn, optionally tensor-parallel (Megatron-LM, Shoeybi et al. 2019).

    ids (B, S) -> token embedding + learned position embedding
    -> blocks: x = x + Attention(LayerNorm(x));  x = x + MLP(LayerNorm(x))     (causal attention)
    -> LayerNorm -> Linear(d, vocab) -> logits (B, S, vocab)

With ``group=None`` every layer is whole (the one-process model). With a tensor-parallel group
(``mesh.tp_group``) each block's attention heads and MLP columns are split over its ranks
(``ParallelAttention``, ``ParallelMLP``: two allreduces forward and two backward per block), while
embeddings and LayerNorms are replicated - their inputs and gradients are the same on every tp
rank - and the output layer is replicated or, with ``vocab_parallel``, split by vocabulary
(parallel/vocab.py). The same seed gives the same model either way.
"""
from __future__ import annotations

import numpy as np

from disttrain import nn
from disttrain.parallel.tensor import ParallelAttention, ParallelMLP
from disttrain.parallel.vocab import VocabParallelLinear


class Block(nn.Module):
    """One pre-LN transformer block; tensor-parallel when `group` is given."""

    def __init__(self, d, heads, ffn, group=None, rng=None, dtype=np.float32):
        self.ln1 = nn.LayerNorm(d, dtype=dtype)
        if group is None:
            self.attn = nn.MultiHeadAttention(d, heads, causal=True, rng=rng, dtype=dtype)
        else:
            self.attn = ParallelAttention(d, heads, group, causal=True, rng=rng, dtype=dtype)
        self.ln2 = nn.LayerNorm(d, dtype=dtype)
        if group is None:
            self.mlp = nn.Sequential(nn.Linear(d, ffn, rng=rng, dtype=dtype), nn.GELU(),
                                     nn.Linear(ffn, d, init="xavier", rng=rng, dtype=dtype))
        else:
            self.mlp = ParallelMLP(d, ffn, group, rng=rng, dtype=dtype)

    def forward(self, x):
        h = x + self.attn.forward(self.ln1.forward(x))
        return h + self.mlp.forward(self.ln2.forward(h))

    def backward(self, dy):
        dh = dy + self.ln2.backward(self.mlp.backward(dy))
        self._grads_ready(self.mlp)
        self._grads_ready(self.ln2)
        dx = dh + self.ln1.backward(self.attn.backward(dh))
        self._grads_ready(self.attn)
        self._grads_ready(self.ln1)
        return dx

    def backward_input(self, dy):
        """B of the block (zero-bubble pipelines): the sub-layers' B in backward order."""
        dh = dy + self.ln2.backward_input(self.mlp.backward_input(dy))
        return dh + self.ln1.backward_input(self.attn.backward_input(dh))

    def backward_weight(self) -> None:
        """W of the block: the sub-layers' W, each reported ready as it returns."""
        for m in (self.mlp, self.ln2, self.attn, self.ln1):
            m.backward_weight()
            self._grads_ready(m)


class TokenPositionEmbedding(nn.Module):
    """ids (B, S) -> token embedding + learned position embedding (B, S, d)."""

    def __init__(self, vocab, d, max_len, rng, dtype):
        self.tok = nn.Embedding(vocab, d, rng=rng, dtype=dtype)
        self.tok.weight.data *= 0.1  # N(0, 0.01): small next to the residual stream's LayerNorm scale
        self.pos = nn.Parameter((0.1 * rng.standard_normal((max_len, d))).astype(dtype))
        self.max_len = max_len

    def forward(self, ids):
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[1] > self.max_len:
            raise ValueError(f"Transformer: ids must be (batch, seq <= {self.max_len}), got shape {ids.shape}")
        return self.tok.forward(ids) + self.pos.data[:ids.shape[1]]

    def backward(self, dx):
        self.pos.grad[:dx.shape[1]] += dx.sum(axis=0)
        self.tok.backward(dx)
        return None  # ids have no gradient


class LMHead(nn.Module):
    """Final LayerNorm and the vocabulary projection (vocabulary-parallel over `group` when given:
    training then yields this rank's block of the logits, for ``VocabParallelCrossEntropy``)."""

    def __init__(self, d, vocab, rng, dtype, group=None):
        self.ln_f = nn.LayerNorm(d, dtype=dtype)
        self.proj = (nn.Linear(d, vocab, init="xavier", rng=rng, dtype=dtype) if group is None else
                     VocabParallelLinear(d, vocab, group, init="xavier", rng=rng, dtype=dtype))

    def forward(self, x):
        return self.proj.forward(self.ln_f.forward(x))

    def backward(self, dy):
        return self.ln_f.backward(self.proj.backward(dy))

    def backward_input(self, dy):
        return self.ln_f.backward_input(self.proj.backward_input(dy))

    def backward_weight(self) -> None:
        for m in (self.proj, self.ln_f):
            m.backward_weight()
            self._grads_ready(m)


class Transformer(nn.Sequential):
    """Args: vocab, d (model width), heads, layers, ffn (MLP width, default 4d), max_len, group
    (tensor-parallel Group or None), seed, dtype, vocab_parallel (with a group: the output layer split
    by vocabulary - train with ``VocabParallelCrossEntropy``; evaluation mode gathers all logits).
    forward(ids) -> logits; backward(dlogits) -> None.
    A Sequential of [embedding, blocks..., head]: ``blocks()`` are the pipeline units."""

    def __init__(self, vocab: int, d: int = 64, heads: int = 4, layers: int = 2, ffn: int | None = None,
                 max_len: int = 64, group=None, seed: int = 0, dtype=np.float32, vocab_parallel: bool = False):
        rng = np.random.default_rng(seed)
        embed = TokenPositionEmbedding(vocab, d, max_len, rng, dtype)
        blocks = [Block(d, heads, ffn or 4 * d, group, rng, dtype) for _ in range(layers)]
        super().__init__(embed, *blocks, LMHead(d, vocab, rng, dtype, group if vocab_parallel else None))
        self.max_len = max_len

    def blocks(self) -> list:
        return list(self.layers)
