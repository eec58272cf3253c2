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
from dataclasses import dataclass, field, replace

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
    layout: str = ""  # ranks per node, topology.Topology.layout ("2x2", "2+1+3"): found, never read
    crossings: int = 1  # flat-ring edges leaving the busiest node (topology.Topology.crossings): found
    alpha_inter: float = 0.0  # latency of a message between nodes (0: not measured, see net())
    beta_inter: float = 0.0  # seconds per byte through one node's network port (0: not measured)


#: Uncalibrated, a message between nodes is assumed NET_SLOWDOWN times slower (latency and
#: seconds per byte through a node's port) than one inside a node. This assumes no link speed -
#: only that the network, not a node's memory, is the bottleneck of a multi-host collective
#: (1-25 Gbit/s ethernet moves 0.1-3 GB/s per port, one core copies ~5-10 GB/s). Under it every
#: flat algorithm pays its bandwidth term at port speed, and the two-level algorithm, which pushes
#: 2(h-1)/h of the vector through each port instead of the flat ring's 2(p-1)/p, wins whenever a
#: node holds more than one rank - at any link speed. calibrate() measures both (costmodel.measure).
NET_SLOWDOWN = 10.0


def interp(c: CostParams, n: float, small: float, large: float) -> float:
    w = min(1.0, max(0.0, (math.log(max(n, 1)) - math.log(SMALL)) / (math.log(LARGE) - math.log(SMALL))))
    return math.exp((1 - w) * math.log(small) + w * math.log(large))


def bg(c: CostParams, n: float) -> tuple[float, float]:
    """(beta, gamma) for a working set of n bytes."""
    return interp(c, n, c.beta, c.beta_large), interp(c, n, c.gamma, c.gamma_large)


def net(c: CostParams) -> tuple[float, float]:
    """(alpha, beta) between nodes: measured, or NET_SLOWDOWN times the intra-node values."""
    return (c.alpha_inter or NET_SLOWDOWN * c.alpha), (c.beta_inter or NET_SLOWDOWN * c.beta_large)


def node_sizes(c: CostParams) -> list:
    """Ranks on each node, from the layout ("2x3" -> [3, 3], "1+2" -> [1, 2]; [p] if unknown)."""
    if "x" in c.layout:
        h, k = c.layout.split("x")
        return [int(k)] * int(h)
    return [int(s) for s in c.layout.split("+")] if c.layout else [c.p]


def across(c: CostParams, ring_order: bool) -> CostParams:
    """The parameters a flat (node-unaware) algorithm sees on a multi-node communicator: every
    step waits for its messages that cross a node's port, which they share - a ring's steps
    (`ring_order`) with the `crossings` ring edges leaving the node, any other pattern's with up
    to all the node's ranks (butterfly, Rabenseifner, trees and the parameter server pair ranks
    far apart in rank order)."""
    a, b = net(c)
    b *= max(1, c.crossings if ring_order else max(node_sizes(c)))
    return replace(c, alpha=a, beta=b, beta_large=b, hosts=1)


def fold(c: CostParams, n: float) -> float:
    """Folding the ranks beyond the largest power of two in and out (0 when p is one)."""
    if c.p == pow2_below(c.p):
        return 0.0
    b, g = bg(c, n)
    return 2 * (c.alpha + n * b) + n * g


def segments(n: float) -> int:
    """Pipeline segments of an n-byte message (config.segment_bytes each)."""
    return max(1, math.ceil(n / config.current().segment_bytes))
