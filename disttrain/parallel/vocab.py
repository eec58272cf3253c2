"""Vocabulary-parallel output layer and cross-entropy (Megatron-LM's parallel softmax: Shoeybi et
al. 2019, sec. 3; Narayanan et al. 2021).

A language model's output layer (hidden -> vocabulary) is its largest GEMM and its logits its
largest activation. Split by vocabulary columns over a tensor-parallel group, rank t holds the
logits of its vocabulary block only, and the softmax cross-entropy is computed without ever
gathering them - three numbers per token cross the group instead of V / tp logits:

    M = max over ranks of the local row maxima                       (allreduce max)
    S = sum over ranks of sum_v exp(z_v - M);  z_target from its owner (one allreduce sum of both)
    loss = log S + M - z_target;  d loss / d z_v = softmax_v - [v = target]   (local, no comm)

The input gradient of the column-parallel layer is the sum of the ranks' parts (Megatron's f).
In evaluation mode (``module.eval()``) the layer gathers the whole vocabulary's logits, so
evaluation code (argmax, a plain cross-entropy) runs unchanged.
"""
from __future__ import annotations

import numpy as np

from .. import comm as C
from ..comm import validate
from .tensor import ColumnParallelLinear


class VocabParallelLinear(ColumnParallelLinear):
    """The output layer split by vocabulary columns: training forward -> this rank's logits block
    (..., V / tp); evaluation forward -> all V logits (an allgather over the group).

    Args: as ``ColumnParallelLinear`` (in_features, vocabulary size divisible by the group size,
    group, bias, init, rng - the full weight is drawn as ``nn.Linear`` would -, dtype, input_grad).

    Example:
        >>> out = VocabParallelLinear(hidden, vocab, mesh.tp_group, init="xavier", rng=rng)
        >>> loss = VocabParallelCrossEntropy(mesh.tp_group).forward(out.forward(h), targets)
    """

    def forward(self, x):
        y = super().forward(x)
        if self.training:
            return y
        parts = C.allgather(np.ascontiguousarray(y)[None], group=self.group)  # (tp, ..., V / tp)
        return np.concatenate(list(parts), axis=-1)


class VocabParallelCrossEntropy:
    """Mean softmax cross-entropy over the targets that are not ``ignore_index``, from logits split
    by vocabulary columns over `group` (each rank passes its block; targets are the same on every
    rank). Equals ``nn.SoftmaxCrossEntropy`` on the gathered logits. Collective over the group.

    Args:
        group: the tensor-parallel Group of the ``VocabParallelLinear`` that made the logits.
        ignore_index: targets that add nothing (padding).

    Returns (``forward``): the mean loss, the same on every rank; ``backward()`` this rank's block
    of the logits' gradient.
    """

    def __init__(self, group, ignore_index: int = -100):
        self.group, self.ignore_index = group, ignore_index

    def terms(self, targets) -> int:
        """The targets the mean counts (those that are not ignore_index)."""
        return int((np.asarray(targets) != self.ignore_index).sum())

    def forward(self, logits, targets) -> float:
        g = self.group
        self._shape = logits.shape
        z = np.ascontiguousarray(logits).reshape(-1, logits.shape[-1])
        t = np.asarray(targets).reshape(-1).astype(np.int64)
        v = z.shape[1]
        vocab = v * g.size
        err = None
        if t.shape[0] != z.shape[0]:
            err = f"{t.shape[0]} targets for {z.shape[0]} rows of logits"
        elif ((t != self.ignore_index) & ((t < 0) | (t >= vocab))).any():
            err = f"targets must lie in [0, {vocab}) or equal ignore_index={self.ignore_index}"
        validate.check(g.comm, "VocabParallelCrossEntropy", dict(vocab=v, rows=z.shape[0]), err, always=True)
        lo = g.rank * v
        valid = t != self.ignore_index
        mine = valid & (t >= lo) & (t < lo + v)
        m = C.allreduce(z.max(axis=1) if len(z) else np.zeros(0, z.dtype), op="max", group=g)
        e = np.exp(z - m[:, None])
        both = np.zeros((2, len(z)), z.dtype)  # sum of exp, target logit: one allreduce
        both[0] = e.sum(axis=1)
        rows = np.flatnonzero(mine)
        both[1, rows] = z[rows, t[rows] - lo]
        C.allreduce_(both, op="sum", group=g)
        self._probs = e / both[0][:, None]
        self._rows, self._cols, self._valid = rows, t[rows] - lo, valid
        self._count = int(valid.sum())
        losses = np.log(both[0]) + m - both[1]
        return float(losses[valid].sum() / max(1, self._count))

    def backward(self):
        d = self._probs.copy()
        d[self._rows, self._cols] -= 1
        d[~self._valid] = 0
        d *= d.dtype.type(1.0 / max(1, self._count))
        return d.reshape(self._shape)
