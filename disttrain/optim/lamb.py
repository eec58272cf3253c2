"""LAMB (You et al. 2020, "Large batch optimization for deep learning: training BERT in 76 minutes"):
Adam's direction, rescaled per layer by the trust ratio ||w|| / ||update|| so that very large
batches (and the large learning rates they need) stay stable."""
from __future__ import annotations

import numpy as np

from .adam import moments
from .optimizer import Optimizer


class LAMB(Optimizer):
    whole_tensor_update = True  # the trust ratio needs the norms of the whole tensor

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.01):
        super().__init__(params, lr)
        self.b1, self.b2 = betas
        self.eps, self.weight_decay = eps, weight_decay

    def _update(self, p, st):
        mhat, vhat = moments(st, p.grad, p.data, self.b1, self.b2, self.steps)
        u = mhat / (np.sqrt(vhat) + self.eps)
        if self.weight_decay:
            u = u + self.weight_decay * p.data
        wn, un = float(np.linalg.norm(p.data)), float(np.linalg.norm(u))
        trust = wn / un if wn > 0 and un > 0 else 1.0
        p.data -= (self.lr * trust * u).astype(p.data.dtype)
