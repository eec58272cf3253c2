"""Butterfly (recursive doubling) AllReduce (Thakur, Rabenseifner & Gropp 2005, sec. 4.1).

In round k every rank swaps its *whole* vector with the rank 2^k away and reduces: log2(p) rounds,
each moving n elements - latency-optimal, so it is the small-message algorithm. Non-powers of two
fold the extra ranks in first and hand them the result at the end (p2p.fold / p2p.unfold).
Reductions are commutative and both partners compute a (op) b on the same pair, so every rank ends
with bit-identical results.
"""
from __future__ import annotations

import math

from . import cost
from .kernels import reduce_into
from .p2p import TAG_XCHG, pow2_allreduce, pow2_below, real_rank, scratch
from .registry import ALLREDUCE


def butterfly_cost(c, n: float) -> float:
    """fold + lg p2 (alpha + n beta + n gamma): the whole vector exchanged and reduced each round."""
    b, g = cost.bg(c, n)
    return cost.fold(c, n) + math.log2(pow2_below(c.p)) * (c.alpha + n * b + n * g)


@ALLREDUCE.register("butterfly", cost=butterfly_cost, overhead=5e-6)
def butterfly(comm, buf, op: int) -> None:
    p, n = comm.Get_size(), buf.shape[0]

    def rounds(newrank, p2):
        tmp = scratch(n, buf.dtype, slot=2)
        mask = 1
        while mask < p2:
            partner = real_rank(newrank ^ mask, p)
            comm.Sendrecv(buf, partner, TAG_XCHG, tmp, partner, TAG_XCHG)
            reduce_into(buf, tmp, op)
            mask <<= 1

    pow2_allreduce(comm, buf, op, rounds)
