"""Hierarchical (two-level) AllGather and ReduceScatter for ranks spread over several nodes.

A flat ring allgather over p ranks on h nodes pushes (p-1)/p of the result through a node's
network port when the nodes hold consecutive ranks (and up to k times that when they do not);
these push (h-1)/h: every byte crosses into each node once, not once per rank (Thakur,
Rabenseifner & Gropp 2005 on SMP-aware collectives; NCCL/Horovod's hierarchical collectives).

allgather, equal nodes of k ranks ("slices", comm/topology.py):
1. across nodes, slice i (local rank i of every node) allgathers its members' own blocks - k
   concurrent allgathers, every rank's link busy, in place in the result buffer;
2. inside each node, allgather what the slices gathered: local rank i contributes the blocks of
   every rank of slice i (packed into one contiguous part, unpacked after).

reduce-scatter, equal nodes - the dual (the first two phases of hier.py's allreduce):
1. inside each node, reduce-scatter with the blocks regrouped by slice: local rank i ends with
   the node's sum of the blocks that belong to slice i's ranks;
2. across nodes, slice i reduce-scatters that part: each member ends with its own block.

The blocks are regrouped (packed) by slice, so the result is the flat algorithm's - block r on
group rank r - whatever the layout: the ranks of a node need not be consecutive in the group.

Nodes holding different numbers of ranks have no equal slices: then the node leaders carry each
node's part (allgather: node allgather, leaders' allgather of the packed node parts, node
broadcast; reduce-scatter: node reduce to the leader, leaders' reduce-scatter of the packed node
parts, scatter in the node) - the same (h-1)/h through each port, from one rank per node.

Without a recorded topology or on one node they run the flat choice (correct, nothing to gain);
``auto`` never picks them there (infinite cost).
"""
from __future__ import annotations

import math

import numpy as np

from .. import mpi
from . import cost
from .costmodel import LATENCY_BOUND, choose
from .hier import shape
from .ops import mpi_op
from .p2p import scratch
from .registry import ALLGATHER, REDUCE_SCATTER
from . import topology

#: scratch slot of the packed (regrouped) vector: distinct from every slot the node and slice
#: algorithms called inside use (p2p.scratch's slots 0-7)
_SLOT = 8


def _levels(c, n: float):
    """(h, k, kmax, beta, gamma, alpha_net, beta_net) for an n-byte vector."""
    h, k = shape(c)
    b, g = cost.bg(c, n)
    an, bn = cost.net(c)
    return h, k, max(cost.node_sizes(c)), b, g, an, bn


def hier_allgather_cost(c, n: float) -> float:
    """n: bytes of the gathered result. Across: (h-1) alpha_net + (h-1)/h n beta_net (each node's
    port carries every remote byte once, shared by its k slices). Inside, equal nodes: a ring
    allgather of k parts of n/k + packing and unpacking (a copy costs beta/2); uneven: a node
    allgather of the own blocks, a broadcast tree of n and the leaders' packing. Infinite on one
    node: there is no second level."""
    if c.hosts <= 1:
        return math.inf
    h, k, kmax, b, _, an, bn = _levels(c, n)
    net = (h - 1) * (an + n / h * bn)
    if k > 1:
        return net + (k - 1) * (c.alpha + n / k * b) + n * b
    lg = math.ceil(math.log2(max(2, kmax)))
    return net + (kmax - 1) * (c.alpha + n / c.p * b) + lg * c.alpha + 2 * n * b


def hier_reduce_scatter_cost(c, n: float) -> float:
    """n: bytes of the whole input vector. The allgather's data movement in reverse, plus the
    reductions: (k-1)/k n gamma inside and (h-1)/h n/k gamma across (uneven: n gamma to the
    leader, (h-1)/h n gamma among the leaders)."""
    if c.hosts <= 1:
        return math.inf
    h, k, _, _, g, _, _ = _levels(c, n)
    red = (k - 1) / k * n * g + (h - 1) / h * n / k * g if k > 1 else n * g + (h - 1) / h * n * g
    return hier_allgather_cost(c, n) + red


def pack(src, starts, lengths, dst) -> None:
    """Concatenate the blocks src[starts[i]:starts[i]+lengths[i]] into dst: one slice copy
    (memcpy) per block. kernels.pack's element loop moved ~0.35 GB/s on uint8 here (8 MiB in
    23 ms, a third of the network phase at 1 Gbit/s); a slice copy runs at memory speed."""
    o = 0
    for s, n in zip(starts.tolist(), lengths.tolist()):
        dst[o:o + n] = src[s:s + n]
        o += n


def unpack(src, starts, lengths, dst) -> None:
    """Inverse of :func:`pack`: the concatenated blocks of src back to their places in dst."""
    o = 0
    for s, n in zip(starts.tolist(), lengths.tolist()):
        dst[s:s + n] = src[o:o + n]
        o += n


def _flat(family: str, nbytes: int) -> str:
    """The flat rule (costmodel._decide's single-node choice) - never "hier", so no recursion on a
    communicator whose parameters claim hosts but that has no recorded topology."""
    return "ring" if nbytes >= LATENCY_BOUND else "mpi"


def _idx(seq) -> np.ndarray:
    return np.asarray(seq, np.int64)


@ALLGATHER.register("hier", cost=hier_allgather_cost, overhead=80e-6)
def hier_allgather(comm, buf, counts, displs) -> None:
    t = topology.of(comm)
    if comm.Get_size() == 1:
        return
    if t is None or t.nodes == 1:
        ALLGATHER.resolve(_flat("allgather", buf.nbytes))(comm, buf, counts, displs)
        return
    counts, displs = _idx(counts), _idx(displs)
    if t.uniform:
        _ag_slices(t, buf, counts, displs)
    else:
        _ag_leaders(t, buf, counts, displs)


def _run_ag(sub, buf, counts, displs) -> None:
    """Allgather on a sub-communicator by the flat rule (its own parameters: one node or one
    slice, never "hier")."""
    if sub.Get_size() > 1:
        nb = int(counts.sum()) * buf.itemsize
        ALLGATHER.resolve(choose("allgather", sub, nb, buf.dtype))(sub, buf, counts, displs)


def _ag_slices(t, buf, counts, displs) -> None:
    groups = [_idx(t.slice_members(i)) for i in range(t.sizes[0])]
    mine = groups[t.local_rank]
    _run_ag(t.slice_comm, buf, counts[mine], displs[mine])  # 1. across: the slice's own blocks
    _packed_ag(t.node_comm, buf, groups, t.local_rank, counts, displs)  # 2. inside: every slice's


def _ag_leaders(t, buf, counts, displs) -> None:
    mine = _idx(t.members[t.node])
    _run_ag(t.node_comm, buf, counts[mine], displs[mine])  # 1. the node's blocks on every rank of it
    if t.local_rank == 0:  # 2. the leaders exchange the packed node parts
        _packed_ag(t.slice_comm, buf, [_idx(m) for m in t.members], t.node, counts, displs)
    if t.node_comm.Get_size() > 1:  # 3. the leader's result to the rest of its node
        t.node_comm.Bcast(buf, root=0)


def _packed_ag(sub, buf, groups, own, counts, displs) -> None:
    """Allgather over `sub`, whose rank i holds the blocks of group ranks groups[i]: each packs its
    group's blocks into one contiguous part, the parts are gathered and unpacked into place."""
    part, pdis = _within(_idx([int(counts[gr].sum()) for gr in groups]))
    stage = scratch(int(part.sum()), buf.dtype, slot=_SLOT)
    lo, mine = int(pdis[own]), groups[own]
    pack(buf, displs[mine], counts[mine], stage[lo:lo + int(part[own])])
    _run_ag(sub, stage, part, pdis)
    for i, gr in enumerate(groups):  # the others' blocks into place (this rank's are there)
        if i != own:
            unpack(stage[int(pdis[i]):], displs[gr], counts[gr], buf)


@REDUCE_SCATTER.register("hier", cost=hier_reduce_scatter_cost, overhead=80e-6)
def hier_reduce_scatter(comm, buf, op, counts, displs):
    t = topology.of(comm)
    r = comm.Get_rank()
    if comm.Get_size() == 1 or t is None or t.nodes == 1:
        name = "ring" if comm.Get_size() == 1 else _flat("reduce_scatter", buf.nbytes)
        return REDUCE_SCATTER.resolve(name)(comm, buf, op, counts, displs)
    counts, displs = _idx(counts), _idx(displs)
    lo, m = int(displs[r]), int(counts[r])
    block = (_rs_slices if t.uniform else _rs_leaders)(t, buf, op, counts, displs)
    buf[lo:lo + m] = block  # block r in its place, as the flat algorithms leave it
    return buf[lo:lo + m]


def _run_rs(sub, part, op, counts, displs):
    """Reduce-scatter on a sub-communicator by the flat rule; returns this rank's reduced block."""
    if sub.Get_size() == 1:
        return part
    nb = part.nbytes
    return REDUCE_SCATTER.resolve(choose("reduce_scatter", sub, nb, part.dtype))(sub, part, op, counts, displs)


def _regroup(buf, groups, counts, displs):
    """buf's blocks packed group after group (scratch) and the (counts, displs) of the groups."""
    order = np.concatenate(groups)
    stage = scratch(int(counts[order].sum()), buf.dtype, slot=_SLOT)
    pack(buf, displs[order], counts[order], stage)
    return (stage, *_within(_idx([int(counts[gr].sum()) for gr in groups])))


def _within(counts):
    """(counts, displs) of consecutive blocks of the given sizes."""
    return counts, np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)


def _rs_slices(t, buf, op, counts, displs):
    groups = [_idx(t.slice_members(i)) for i in range(t.sizes[0])]
    stage, part, pdis = _regroup(buf, groups, counts, displs)
    mine = _run_rs(t.node_comm, stage, op, part, pdis)  # 1. inside: slice lr's blocks, node sums
    sc, sd = _within(counts[groups[t.local_rank]])
    return _run_rs(t.slice_comm, mine, op, sc, sd)  # 2. across: own block, summed everywhere


def _rs_leaders(t, buf, op, counts, displs):
    groups = [_idx(m) for m in t.members]
    stage, part, pdis = _regroup(buf, groups, counts, displs)
    node, lead = t.node_comm, t.local_rank == 0
    if node.Get_size() > 1:  # 1. the node's sum on its leader
        if lead:
            node.Reduce(mpi.MPI.IN_PLACE, stage, op=mpi_op(op), root=0)
        else:
            node.Reduce(stage, None, op=mpi_op(op), root=0)
    mc, md = _within(counts[groups[t.node]])
    if lead:  # 2. the leaders reduce-scatter the node parts: each gets its node's part
        own = _run_rs(t.slice_comm, stage, op, part, pdis)
    else:
        own = None
    out = np.empty(int(mc[t.local_rank]), buf.dtype)
    if node.Get_size() > 1:  # 3. the leader scatters its node's part
        node.Scatterv([own, (mc, md)] if lead else None, out, root=0)
    else:
        out[...] = own
    return out
