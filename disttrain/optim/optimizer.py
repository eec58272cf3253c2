"""Optimizer base: parameters, a learning rate a schedule may change, named per-parameter state."""
from __future__ import annotations

import numpy as np

from .. import timeline


class Optimizer:
    def __init__(self, params, lr: float):
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        if lr <= 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        self.lr = lr
        self.state: dict = {}  # parameter name -> {buffer name: array}; keyed by stable names
        self.steps = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad[...] = 0  # in place: DataParallel's bucket views must survive

    def step(self) -> None:
        self.steps += 1
        with timeline.span(f"{type(self).__name__}.step", "optim"):
            for p in self.params:
                self._update(p, self.state.setdefault(p.name, {}))

    def _update(self, p, st: dict) -> None:
        raise NotImplementedError

    def state_arrays(self) -> dict:
        """Flat {"param/buffer": array} view of the state (for broadcast and checkpoints)."""
        return {f"{k}/{b}": v for k, st in self.state.items() for b, v in st.items()}

    @staticmethod
    def _buf(st: dict, key: str, like: np.ndarray) -> np.ndarray:
        if key not in st:
            st[key] = np.zeros_like(like)
        return st[key]
