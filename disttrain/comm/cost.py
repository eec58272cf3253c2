"""The alpha-beta-gamma cost model's vocabulary: machine parameters and the shared terms.

The formulas follow Thakur, Rabenseifner & Gropp, "Optimization of Collective Communication
Operations in MPICH" (IJHPCA 2005): a message of m bytes costs alpha + m*beta, reducing m bytes
costs m*gamma. n is the reduced vector in bytes, p the ranks, p2 the largest power of two <= p.
Each algorithm's own formula lives beside the algorithm and is registered with it
(``@ALLREDUCE.register("ring", cost=ring_cost, overhead=...)``), so adding an algorithm is one
module; ``costmodel`` calibrates the parameters and picks by the registered formulas.

beta and gamma depend on the working set: a vector that fits in cache moves and reduces several
times faster than one streamed from DRAM, so both are measured at 1 MiB and at 32 MiB and
interpolated in log(n) between (constant outside). Every algorithm also pays a fixed software
overhead o_a per call (LogP's "o": Python, request objects, scratch buffers), which is what makes
the latency-optimal algorithm lose to the MPI library's C code for tiny messages.

  fold (p != p2)   2 (alpha + n beta) + n gamma   (the extra ranks fold into a power of two first)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import config
from .p2p import pow2_below

SMALL, LARGE = 1 << 20, 32 << 20  # working sets at which beta and gamma are measured
@dataclass
class CostParams:
    """Calibrated machine parameters for one communicator size (seconds, seconds per byte)."""

    p: int
    alpha: float = 3e-6
    beta: float = 1.0e-10  # at SMALL bytes (cache-resident)
    gamma: float = 3.0e-11
    beta_large: float = 1.6e-10  # at LARGE bytes (DRAM)
    gamma_large: float = 1.2e-10
    overhead: dict = field(default_factory=dict)  # algorithm -> o (s per call)
    native: list = field(default_factory=list)  # [(bytes, seconds)] of the library's allreduce
    source: str = "defaults"
    hosts: int = 1  # nodes the communicator spans: found by costmodel.ensure, never read from a file


def interp(c: CostParams, n: float, small: float, large: float) -> float:
    w = min(1.0, max(0.0, (math.log(max(n, 1)) - math.log(SMALL)) / (math.log(LARGE) - math.log(SMALL))))
    return math.exp((1 - w) * math.log(small) + w * math.log(large))


def bg(c: CostParams, n: float) -> tuple[float, float]:
    """(beta, gamma) for a working set of n bytes."""
    return interp(c, n, c.beta, c.beta_large), interp(c, n, c.gamma, c.gamma_large)


def fold(c: CostParams, n: float) -> float:
    """Folding the ranks beyond the largest power of two in and out (0 when p is one)."""
    if c.p == pow2_below(c.p):
        return 0.0
    b, g = bg(c, n)
    return 2 * (c.alpha + n * b) + n * g


def segments(n: float) -> int:
    """Pipeline segments of an n-byte message (config.segment_bytes each)."""
    return max(1, math.ceil(n / config.current().segment_bytes))
