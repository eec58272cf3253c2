"""SGD with momentum, Nesterov momentum and L2 weight decay (PyTorch's update rule)."""
from __future__ import annotations

from .kernels import sgd_step
from .optimizer import Optimizer
from .rowwise import sgd_rows


class SGD(Optimizer):
    """v <- momentum * v + (g + wd * w);  w <- w - lr * (g + wd*w + momentum * v if nesterov else v).

    Row-sparse gradients (embeddings with ``sparse=True``) update only the touched rows. Plain SGD
    (no momentum, no weight decay) is then identical to the dense update. With momentum it is lazy
    momentum (TensorFlow's SparseApplyMomentum): an untouched row keeps its weights and its
    momentum buffer frozen until its next touch, where dense momentum would keep moving it by
    ``lr * mu^k * v``; weight decay too applies to touched rows only.
    """

    sparse = True

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__(params, lr)
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay

    def _update(self, p, st):
        first = "momentum" not in st
        v = self._buf(st, "momentum", p.data) if self.momentum else p.data  # v unused without momentum
        w = p.data.reshape(-1)
        sgd_step(w, p.grad.reshape(-1), v.reshape(-1), w.dtype.type(self.lr), w.dtype.type(self.momentum),
                 w.dtype.type(self.weight_decay), self.nesterov, first)

    def _update_rows(self, p, st, g):
        # the buffer starts at zero, so the first touch gives v = d: PyTorch's first step
        v = self._buf(st, "momentum", p.data) if self.momentum else p.data  # v unused without momentum
        w, f = self._rows(p.data), p.data.dtype.type
        sgd_rows(w, g.rows, self._rows(g.values), self._rows(v), f(self.lr), f(self.momentum), f(self.weight_decay),
                 self.nesterov)
