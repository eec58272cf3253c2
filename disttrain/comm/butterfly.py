"""Butterfly (recursive doubling) AllReduce (Thakur, Rabenseifner & Gropp 2005, sec. 4.1).

In round k every rank swaps its *whole* vector with the rank 2^k away and reduces: log2(p) rounds,
each moving n elements - latency-optimal, so it is the small-message algorithm. Non-powers of two
fold the extra ranks in first and hand them the result at the end (p2p.fold / p2p.unfold).
Reductions are commutative and both partners compute a (op) b on the same pair, so every rank ends
with bit-identical results.
"""
from __future__ import annotations

from .kernels import reduce_into
from .p2p import TAG_XCHG, fold, pow2_below, real_rank, scratch, unfold
from .registry import ALLREDUCE


@ALLREDUCE.register("butterfly")
def butterfly(comm, buf, op: int) -> None:
    p, n = comm.Get_size(), buf.shape[0]
    if p == 1 or n == 0:
        return
    newrank = fold(comm, buf, op)
    if newrank >= 0:
        p2 = pow2_below(p)
        tmp = scratch(n, buf.dtype, slot=2)
        mask = 1
        while mask < p2:
            partner = real_rank(newrank ^ mask, p)
            comm.Sendrecv(buf, partner, TAG_XCHG, tmp, partner, TAG_XCHG)
            reduce_into(buf, tmp, op)
            mask <<= 1
    unfold(comm, buf)
