"""Double binary tree AllReduce (Sanders, Speck & Traff 2009, "Two-tree algorithms for full
bandwidth broadcast, reduction and scan"; NCCL uses the same construction).

A single binary tree wastes half the bandwidth: leaves only send up and receive down once, while
interior nodes do twice that. Two trees in which every rank is interior in at most one of them
(tree 2 is tree 1 rotated by one position: tree 1's interior nodes are the odd ranks, tree 2's
the even ones) each carry half of the data, concurrently, so every rank's links are busy in both
directions and the per-rank traffic is balanced while the latency stays logarithmic.
"""
from __future__ import annotations

from . import config, cost
from .p2p import seg_elems
from .registry import ALLREDUCE
from .tree import pipelined_tree_allreduce, tree_links, tree_shape


def double_tree_cost(c, n: float) -> float:
    """(2h + S - 1)((2k+4) alpha + n/(2S) ((k+2) beta + k gamma)): each tree carries n/2, and a
    rank is interior in one tree and a leaf (one segment each way) in the other."""
    (h, k), s, (b, g) = tree_shape(c.p), cost.segments(n / 2), cost.bg(c, n)
    inner = k + (c.p > 2) + 1  # interior in one tree, plus one segment each way as a leaf of the other
    return (2 * h + s - 1) * (2 * inner * c.alpha + n / (2 * s) * (inner * b + k * g))


@ALLREDUCE.register("double_tree", cost=double_tree_cost, overhead=30e-6)
def double_tree(comm, buf, op: int) -> None:
    p, r = comm.Get_size(), comm.Get_rank()
    n = buf.shape[0]
    if p == 1 or n == 0:
        return
    (par1, kids1), (par2, kids2) = tree_links(p, 0), tree_links(p, 1)
    h = (n + 1) // 2
    parts = [(buf[:h], par1[r], kids1[r])]
    if n > h:
        parts.append((buf[h:], par2[r], kids2[r]))
    pipelined_tree_allreduce(comm, parts, op, seg_elems(buf, config.current().segment_bytes))
