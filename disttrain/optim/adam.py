"""Adam (Kingma & Ba 2015) and AdamW (decoupled weight decay, Loshchilov & Hutter 2019)."""
from __future__ import annotations

import numpy as np

from .optimizer import Optimizer


def moments(st: dict, g: np.ndarray, like: np.ndarray, b1: float, b2: float, t: int):
    """Adam's bias-corrected first and second moment estimates at step t (state updated in place)."""
    m = st.setdefault("m", np.zeros_like(like))
    v = st.setdefault("v", np.zeros_like(like))
    m *= b1
    m += (1 - b1) * g
    v *= b2
    v += (1 - b2) * g * g
    return m / (1 - b1 ** t), v / (1 - b2 ** t)


class Adam(Optimizer):
    decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, lr)
        self.b1, self.b2 = betas
        self.eps, self.weight_decay = eps, weight_decay

    def _update(self, p, st):
        g = p.grad
        if self.weight_decay and not self.decoupled:
            g = g + self.weight_decay * p.data
        mhat, vhat = moments(st, g, p.data, self.b1, self.b2, self.steps)
        if self.weight_decay and self.decoupled:
            p.data -= self.lr * self.weight_decay * p.data
        p.data -= (self.lr * mhat / (np.sqrt(vhat) + self.eps)).astype(p.data.dtype)


class AdamW(Adam):
    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(params, lr, betas, eps, weight_decay)
