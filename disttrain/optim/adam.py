"""Adam (Kingma & Ba 2015) and AdamW (decoupled weight decay, Loshchilov & Hutter 2019)."""
from __future__ import annotations

import numpy as np

from .optimizer import Optimizer
from .rowwise import adam_rows


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
    """Adam; given a row-sparse gradient (embeddings with ``sparse=True``) it is *lazy Adam*.

    Lazy Adam (TensorFlow Addons' LazyAdam, PyTorch's SparseAdam): only the touched rows' m, v and
    weights change; an untouched row keeps all three (dense Adam would decay its m and v and keep
    moving it by its old momentum). Bias correction uses the optimizer's global step t, counted
    once per ``step()`` whether a row was touched or not (as LazyAdam and SparseAdam do), and the
    update of a touched row is dense Adam's ``lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``
    - so a table whose every row is touched at every step follows dense Adam. Weight decay (L2 for
    Adam, decoupled for AdamW) applies to touched rows only. m and v are ordinary arrays of the
    parameter's shape (state "m", "v"), the same as dense Adam's.
    """

    decoupled = False
    sparse = True

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

    def _update_rows(self, p, st, g):
        m, v = self._buf(st, "m", p.data), self._buf(st, "v", p.data)
        f, t = p.data.dtype.type, self.steps
        adam_rows(self._rows(p.data), g.rows, self._rows(g.values), self._rows(m), self._rows(v), f(self.lr),
                  f(self.b1), f(self.b2), f(self.eps), f(self.weight_decay), self.decoupled, f(1 - self.b1 ** t),
                  f(1 - self.b2 ** t))


class AdamW(Adam):
    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(params, lr, betas, eps, weight_decay)
