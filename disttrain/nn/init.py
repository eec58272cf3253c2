"""Weight initialisation (He et al. 2015 "Kaiming"; Glorot & Bengio 2010 "Xavier")."""
from __future__ import annotations

import math

import numpy as np


def kaiming_uniform(rng: np.random.Generator, fan_in: int, shape, dtype=np.float32, gain: float = math.sqrt(2.0)):
    """U(-b, b) with b = gain * sqrt(3 / fan_in): variance gain^2 / fan_in (ReLU: gain = sqrt 2)."""
    b = gain * math.sqrt(3.0 / max(1, fan_in))
    return rng.uniform(-b, b, size=shape).astype(dtype)


def xavier_uniform(rng: np.random.Generator, fan_in: int, fan_out: int, shape, dtype=np.float32):
    """U(-b, b) with b = sqrt(6 / (fan_in + fan_out)): keeps activation and gradient variance."""
    b = math.sqrt(6.0 / max(1, fan_in + fan_out))
    return rng.uniform(-b, b, size=shape).astype(dtype)
