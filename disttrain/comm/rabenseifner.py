"""Rabenseifner AllReduce: recursive-halving reduce-scatter + recursive-doubling allgather
(Rabenseifner 2004; Thakur, Rabenseifner & Gropp 2005, sec. 4.2).

Bandwidth 2(p-1)/p * n like the ring but only 2 log2(p) messages, so it wins for medium and large
messages at moderate p. Blocks follow np.array_split over the power-of-two subset of ranks; in the
halving phase a rank keeps the half of its current block range that contains its own block.
"""
from __future__ import annotations

import math

from . import cost
from .kernels import reduce_into
from .p2p import TAG_AG, TAG_RS, blocks, pow2_allreduce, pow2_below, real_rank, scratch
from .registry import ALLREDUCE


def rabenseifner_cost(c, n: float) -> float:
    """fold + 2 lg p2 alpha + (p2-1)/p2 n (2 beta + gamma): halving then doubling, each moving
    half of the previous round's data."""
    p2, (b, g) = pow2_below(c.p), cost.bg(c, n)
    return cost.fold(c, n) + 2 * math.log2(p2) * c.alpha + (p2 - 1) / p2 * n * (2 * b + g)


@ALLREDUCE.register("rabenseifner", cost=rabenseifner_cost, overhead=15e-6)
def rabenseifner(comm, buf, op: int) -> None:
    p, n = comm.Get_size(), buf.shape[0]

    def halving_doubling(newrank, p2):
        bounds = blocks(n, p2)[1] + (n,)
        tmp = scratch((n + 1) // 2 + 1, buf.dtype, slot=2)
        lo, hi, mask = 0, p2, p2 >> 1
        while mask:  # recursive halving: keep the half holding block `newrank`
            partner = real_rank(newrank ^ mask, p)
            mid = (lo + hi) // 2
            keep, give = ((lo, mid), (mid, hi)) if not newrank & mask else ((mid, hi), (lo, mid))
            k0, k1, g0, g1 = bounds[keep[0]], bounds[keep[1]], bounds[give[0]], bounds[give[1]]
            comm.Sendrecv(buf[g0:g1], partner, TAG_RS, tmp[:k1 - k0], partner, TAG_RS)
            reduce_into(buf[k0:k1], tmp[:k1 - k0], op)
            (lo, hi), mask = keep, mask >> 1
        mask = 1
        while mask < p2:  # recursive doubling: swap owned ranges, doubling them
            partner = real_rank(newrank ^ mask, p)
            width = hi - lo
            olo, ohi = (hi, hi + width) if not newrank & mask else (lo - width, lo)
            comm.Sendrecv(buf[bounds[lo]:bounds[hi]], partner, TAG_AG,
                          buf[bounds[olo]:bounds[ohi]], partner, TAG_AG)
            lo, hi, mask = min(lo, olo), max(hi, ohi), mask << 1

    pow2_allreduce(comm, buf, op, halving_doubling)
