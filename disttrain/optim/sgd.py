"""SGD with momentum, Nesterov momentum and L2 weight decay (PyTorch's update rule)."""
from __future__ import annotations

from .kernels import sgd_step
from .optimizer import Optimizer


class SGD(Optimizer):
    """v <- momentum * v + (g + wd * w);  w <- w - lr * (g + wd*w + momentum * v if nesterov else v)."""

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
