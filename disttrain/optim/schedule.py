"""Learning-rate schedules with linear warm-up (Goyal et al. 2017), and the linear scaling rule."""
from __future__ import annotations

import math


def linear_scaling(base_lr: float, global_batch: int, base_batch: int = 256) -> float:
    """Goyal et al. 2017: scale the learning rate with the global batch size."""
    return base_lr * global_batch / base_batch


class Schedule:
    """Sets ``opt.lr`` from the step count: ``sched.step()`` once per optimizer step."""

    def __init__(self, opt, warmup_steps: int = 0):
        self.opt, self.base_lr, self.warmup, self.t = opt, opt.lr, warmup_steps, 0
        self._apply()

    def factor(self, t: int) -> float:
        return 1.0

    def step(self) -> None:
        self.t += 1
        self._apply()

    def state_dict(self) -> dict:
        """The schedule's position (for checkpoints)."""
        return {"t": self.t}

    def load_state_dict(self, d: dict) -> None:
        """Continue from a saved position: ``opt.lr`` is set for step ``d["t"]``."""
        self.t = int(d["t"])
        self._apply()

    def _apply(self) -> None:
        w = min(1.0, (self.t + 1) / self.warmup) if self.warmup else 1.0
        self.opt.lr = self.base_lr * w * self.factor(self.t)


class WarmupCosine(Schedule):
    """Linear warm-up, then cosine decay to `min_factor` of the base rate at `total_steps`."""

    def __init__(self, opt, total_steps: int, warmup_steps: int = 0, min_factor: float = 0.0):
        self.total, self.min_factor = total_steps, min_factor
        super().__init__(opt, warmup_steps)

    def factor(self, t):
        if t < self.warmup:
            return 1.0
        frac = min(1.0, (t - self.warmup) / max(1, self.total - self.warmup))
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * frac))


class WarmupStep(Schedule):
    """Linear warm-up, then multiply by `gamma` every `step_size` steps."""

    def __init__(self, opt, step_size: int, gamma: float = 0.1, warmup_steps: int = 0):
        self.step_size, self.gamma = step_size, gamma
        super().__init__(opt, warmup_steps)

    def factor(self, t):
        return self.gamma ** (max(0, t - self.warmup) // self.step_size)
