"""Binary-tree AllReduce (reduce to the root, then broadcast), pipelined in segments; tree Broadcast.

The tree is the *in-order* binary tree on positions 1..p: position x with lowest set bit 2^k has
children x - 2^(k-1) and x + 2^(j) (the largest 2^j < 2^k that stays <= p); the root is the
largest power of two <= p. Its leaves are exactly the odd positions, which is what lets
double_tree.py build a second tree whose interior nodes are this one's leaves (Sanders, Speck &
Traff 2009). Ranks map to positions with a rotation, ``rank = (pos - 1 + shift) mod p``.

Pipelining: data is cut into segments; a node reduces its children's segment s and sends it up
while segment s+1 is still arriving, and the root starts broadcasting segment s as soon as it is
reduced, so for S segments and depth h the time is ~ (h + S - 1) segment steps instead of h * S.
"""
from __future__ import annotations

from functools import lru_cache

from . import config, cost
from .kernels import reduce_into
from .p2p import TAG_BCAST, TAG_DOWN, TAG_UP, pow2_below, scratch, seg_elems, segments, waitall
from .registry import ALLREDUCE, BROADCAST


def _child_positions(x: int, p: int) -> list:
    low = x & -x
    if low == 1:
        return []
    h = low >> 1
    kids = [x - h]
    while h and x + h > p:
        h >>= 1
    if h:
        kids.append(x + h)
    return kids


@lru_cache(maxsize=256)
def tree_links(p: int, shift: int = 0) -> tuple:
    """(parent, children) lists indexed by rank for the rotated in-order tree; parent[root] = -1."""
    parent = [-1] * p
    children = [[] for _ in range(p)]
    rank_of = lambda pos: (pos - 1 + shift) % p  # noqa: E731
    stack = [pow2_below(p)]
    while stack:
        x = stack.pop()
        for c in _child_positions(x, p):
            parent[rank_of(c)] = rank_of(x)
            children[rank_of(x)].append(rank_of(c))
            stack.append(c)
    return tuple(parent), tuple(tuple(c) for c in children)


def tree_root(p: int, shift: int = 0) -> int:
    return (pow2_below(p) - 1 + shift) % p


def pipelined_tree_allreduce(comm, parts, op: int, seg: int) -> None:
    """Allreduce each piece of data over its own tree, all trees interleaved segment by segment.

    Args:
        parts: [(buf_view, parent, children)] - one entry per tree (two for double_tree).
    All receives are posted before any wait and every send is non-blocking, so the only waits are
    on data from children (up) or the parent (down): acyclic, hence deadlock-free.
    """
    plan = []
    ups_out, sends = [], []  # up-sends vs root/down sends: only the former gate the down phase
    for t, (b, parent, kids) in enumerate(parts):
        segs = segments(0, b.shape[0], seg)
        tmp = scratch(b.shape[0] * len(kids), b.dtype, slot=4 + t)
        n = b.shape[0]
        ups = [[comm.Irecv(tmp[i * n + o:i * n + o + m], kid, TAG_UP + 1000 * t) for o, m in segs]
               for i, kid in enumerate(kids)]
        plan.append((b, parent, kids, segs, tmp, ups))
    nseg = max((len(p_[3]) for p_ in plan), default=0)
    for s in range(nseg):  # up: reduce children's segment s, pass it on
        for t, (b, parent, kids, segs, tmp, ups) in enumerate(plan):
            if s >= len(segs):
                continue
            o, m = segs[s]
            n = b.shape[0]
            for i in range(len(kids)):
                ups[i][s].Wait()
                reduce_into(b[o:o + m], tmp[i * n + o:i * n + o + m], op)
            if parent >= 0:
                ups_out.append(comm.Isend(b[o:o + m], parent, TAG_UP + 1000 * t))
            else:  # the root's segment is final: start the broadcast now
                sends.extend(comm.Isend(b[o:o + m], kid, TAG_DOWN + 1000 * t) for kid in kids)
    # Our up-sends must leave before the same memory receives the result. Not the root's down-sends:
    # in a double tree a rank is root of one tree and child in the other, and waiting for those
    # here would deadlock against the peer that posts its down-receives only after this point.
    waitall(ups_out)
    downs = [[comm.Irecv(b[o:o + m], parent, TAG_DOWN + 1000 * t) for o, m in segs] if parent >= 0 else []
             for t, (b, parent, kids, segs, _, _) in enumerate(plan)]
    for s in range(nseg):  # down: forward the result segment to the children as it arrives
        for t, (b, parent, kids, segs, _, _) in enumerate(plan):
            if parent < 0 or s >= len(segs):
                continue
            downs[t][s].Wait()
            o, m = segs[s]
            sends.extend(comm.Isend(b[o:o + m], kid, TAG_DOWN + 1000 * t) for kid in kids)
    waitall(sends)


def tree_shape(p: int) -> tuple[int, int]:
    """(height, most children of any node) of the in-order tree."""
    parent, children = tree_links(p)
    h = 0
    for r in range(p):
        d, q = 0, r
        while parent[q] >= 0:
            q, d = parent[q], d + 1
        h = max(h, d)
    return h, max(len(ch) for ch in children)


def tree_cost(c, n: float) -> float:
    """(2h + S - 1)((2k+2) alpha + n/S ((k+1) beta + k gamma)), h the height, k the most children,
    S the segments. A pipelined reduce-then-broadcast takes 2h + S - 1 segment steps (the last
    segment reaches the root after h + S - 1, the leaves h steps later); each step is bounded by
    the busiest node: an interior node receives k segments from below and one from above while
    sending one up and k down, and a simultaneous send + receive of m bytes costs m beta (how beta
    is measured), hence (k+1) beta per segment (k when p == 2: no node has a parent and children)."""
    (h, k), s, (b, g) = tree_shape(c.p), cost.segments(n), cost.bg(c, n)
    inner = k + (c.p > 2)  # the busiest node's segments in (= out) per step; the root has no parent
    return (2 * h + s - 1) * (2 * inner * c.alpha + n / s * (inner * b + k * g))


@ALLREDUCE.register("tree", cost=tree_cost, overhead=15e-6)
def tree(comm, buf, op: int) -> None:
    p, r = comm.Get_size(), comm.Get_rank()
    if p == 1 or buf.shape[0] == 0:
        return
    parent, children = tree_links(p)
    pipelined_tree_allreduce(comm, [(buf, parent[r], children[r])], op,
                             seg_elems(buf, config.current().segment_bytes))


@BROADCAST.register("tree")
def tree_broadcast(comm, buf, root: int) -> None:
    """Pipelined binary-tree broadcast, the tree rotated so that `root` is its root."""
    p, r = comm.Get_size(), comm.Get_rank()
    if p == 1 or buf.shape[0] == 0:
        return
    shift = (root - tree_root(p)) % p
    parent, children = tree_links(p, shift)
    segs = segments(0, buf.shape[0], seg_elems(buf, config.current().segment_bytes))
    par, kids = parent[r], children[r]
    sends = []
    if par < 0:
        sends = [comm.Isend(buf[o:o + m], kid, TAG_BCAST) for o, m in segs for kid in kids]
    else:
        recvs = [comm.Irecv(buf[o:o + m], par, TAG_BCAST) for o, m in segs]
        for (o, m), req in zip(segs, recvs):
            req.Wait()
            sends.extend(comm.Isend(buf[o:o + m], kid, TAG_BCAST) for kid in kids)
    waitall(sends)
