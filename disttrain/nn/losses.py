"""Losses: forward(prediction, target) -> scalar; backward() -> d loss / d prediction;
terms(target) -> how many terms the mean is over (a pipeline weights its micro-batches by it)."""
from __future__ import annotations

import numpy as np

from . import kernels as K


class SoftmaxCrossEntropy:
    """Mean cross-entropy of softmax(logits) over the targets that are not `ignore_index`.

    Fused in one numba pass (stable log-sum-exp); targets equal to ignore_index (padding) add
    nothing to the loss or the gradient, and the mean is over the counted targets only.
    """

    def __init__(self, ignore_index: int = -100):
        self.ignore_index = ignore_index

    def forward(self, logits, targets) -> float:
        logits = np.ascontiguousarray(logits)
        c = logits.shape[-1]
        self._shape = logits.shape
        l2 = logits.reshape(-1, c)
        t = np.ascontiguousarray(targets).reshape(-1).astype(np.int64)
        if t.shape[0] != l2.shape[0]:
            raise ValueError(f"{t.shape[0]} targets for {l2.shape[0]} rows of logits")
        bad = (t != self.ignore_index) & ((t < 0) | (t >= c))
        if bad.any():
            raise IndexError(f"targets must lie in [0, {c}) or equal ignore_index={self.ignore_index}")
        self._probs = np.empty_like(l2)
        losses = np.empty(l2.shape[0], l2.dtype)
        self._t = t
        self._count = K.softmax_xent_fwd(l2, t, self.ignore_index, self._probs, losses)
        return float(losses.sum() / max(1, self._count))

    def terms(self, targets) -> int:
        """The targets the mean counts (those that are not ignore_index)."""
        return int((np.asarray(targets) != self.ignore_index).sum())

    def backward(self):
        d = np.empty_like(self._probs)
        K.softmax_xent_bwd(self._probs, self._t, self.ignore_index, 1.0 / max(1, self._count), d)
        return d.reshape(self._shape)


class MSE:
    """Mean squared error over all elements (0.0 and a zero gradient on no elements: an empty
    pipeline micro-batch)."""

    def terms(self, target) -> int:
        return int(np.asarray(target).size)

    def forward(self, pred, target) -> float:
        self._diff = np.asarray(pred) - np.asarray(target)
        return float(np.mean(self._diff.astype(np.float64) ** 2)) if self._diff.size else 0.0

    def backward(self):
        return (2.0 / max(1, self._diff.size)) * self._diff


class BCEWithLogits:
    """Mean binary cross-entropy of sigmoid(logits) against 0/1 targets (click prediction),
    computed from the logits in the stable form max(z, 0) - z*y + log(1 + exp(-|z|))."""

    def terms(self, targets) -> int:
        return int(np.asarray(targets).size)

    def forward(self, logits, targets) -> float:
        z = np.asarray(logits)
        y = np.asarray(targets).reshape(z.shape).astype(z.dtype)
        if z.size and ((y != 0) & (y != 1)).any():
            raise ValueError("BCEWithLogits targets must be 0 or 1")
        self._z, self._y = z, y
        losses = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
        return float(losses.mean()) if z.size else 0.0

    def backward(self):
        z = self._z
        e = np.exp(-np.abs(z))  # sigmoid without overflow on either side
        sig = np.where(z >= 0, 1 / (1 + e), e / (1 + e))
        return ((sig - self._y) / max(1, z.size)).astype(z.dtype)
