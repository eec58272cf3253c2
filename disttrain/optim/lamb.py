"""LAMB (You et al. 2020, "Large batch optimization for deep learning: training BERT in 76 minutes"):
Adam's direction, rescaled per layer by the trust ratio ||w|| / ||update|| so that very large
batches (and the large learning rates they need) stay stable."""
from __future__ import annotations

import numpy as np

from .. import timeline
from .adam import moments
from .optimizer import Optimizer


class LAMB(Optimizer):
    """LAMB. ``norm_sums`` (default None: every parameter is a whole tensor) is set by a sharded
    DataParallel whose ranks hold slices of each tensor: ``norm_sums(sq)`` takes this rank's
    per-parameter squared norms (rows [||w||^2, ||u||^2], in ``params`` order) and returns the sums
    over the slices of each tensor, so the trust ratios are the whole tensors' (ZeRO stays exact)."""

    whole_tensor_update = True  # the trust ratio needs the norms of the whole tensor
    norm_sums = None

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.01):
        super().__init__(params, lr)
        self.b1, self.b2 = betas
        self.eps, self.weight_decay = eps, weight_decay

    def _direction(self, p, st):
        mhat, vhat = moments(st, p.grad, p.data, self.b1, self.b2, self.steps)
        u = mhat / (np.sqrt(vhat) + self.eps)
        return u + self.weight_decay * p.data if self.weight_decay else u

    def _apply(self, p, u, wn: float, un: float) -> None:
        trust = wn / un if wn > 0 and un > 0 else 1.0
        p.data -= (self.lr * trust * u).astype(p.data.dtype)

    def _update(self, p, st):
        u = self._direction(p, st)
        self._apply(p, u, float(np.linalg.norm(p.data)), float(np.linalg.norm(u)))

    def step(self) -> None:
        if self.norm_sums is None:
            return super().step()
        self.steps += 1
        with timeline.span("LAMB.step", "optim"):
            us = [self._direction(p, self.state.setdefault(p.name, {})) for p in self.params]
            sq = np.array([[np.dot(p.data.reshape(-1), p.data.reshape(-1)), np.dot(u.reshape(-1), u.reshape(-1))]
                           for p, u in zip(self.params, us)], np.float64).reshape(-1, 2)
            total = self.norm_sums(sq)
            for p, u, (w2, u2) in zip(self.params, us, total):
                self._apply(p, u, float(np.sqrt(w2)), float(np.sqrt(u2)))
        for fn in self._post_step_hooks:
            fn()
