"""Hierarchical AllToAll(v): node aggregation, one network message per node pair and slice.

A flat pairwise alltoall sends p-1 messages per rank, p-k of them across the network - k(p-k)
network messages leave each node of k ranks, each 1/p of a rank's data: at scale the network's
per-message latency dominates (sparse embeddings send small, uneven blocks). Here (the two-phase
"node-aware" alltoall of Sack & Gropp 2012, Träff & Rougier 2014; NCCL/DeepEP's node-aggregated
all-to-all) every block crosses the network once, in h-1 messages per rank:

1. inside each node, aggregate: the blocks a rank sends to the ranks of other nodes go to the
   node-mate that forwards them - for destination d (local rank j on its node) that is local
   rank ``j mod k_a`` of the sending node a (equal nodes: the same local rank, slice j) - packed
   into one message per node-mate together with its own direct block;
2. across nodes, the forwarder of node a sends each destination d one message holding what all
   of node a's ranks send to d, headed by their byte counts (d does not know them), and d
   unpacks the blocks into the result in group-rank order.

So a node sends one message per (other node, destination rank of it) - with k ranks per node,
one message per node pair per slice instead of k^2 - and each rank sends h-1 of them. The byte
counts inside a node are shared first (one node allgather of the k send-count vectors), so every
intra-node receive is posted with its size. Works for any layout (uneven nodes, ranks of a node
not consecutive in the group); without a recorded topology or on one node it is pairwise.
"""
from __future__ import annotations

import math

import numpy as np

from .. import mpi
from . import cost, topology
from .alltoall import pairwise
from .hier_gather import pack
from .p2p import waitall
from .registry import ALLTOALL

#: tags of the two phases (node communicator, group communicator); p2p.py's run 100-112
TAG_NODE, TAG_NET = 120, 121


def hier_alltoall_cost(c, n: float) -> float:
    """n: bytes one rank sends (agreed: the largest). Inside (k-1 messages of h blocks, n/p each)
    + packing and unpacking (three copies, beta/2 each) + across: h-1 messages per rank, the
    node's port carrying what its k ranks send off the node, k n (p-k)/p. The flat pairwise
    exchange moves the same bytes through the port but in p-k network messages per rank: this
    wins on latency (small and uneven blocks, many ranks per node), not on bandwidth. Infinite on
    one node."""
    if c.hosts <= 1:
        return math.inf
    sizes = cost.node_sizes(c)
    h, k = len(sizes), max(sizes)
    b, _ = cost.bg(c, n)
    an, bn = cost.net(c)
    return (k - 1) * (c.alpha + h * n / c.p * b) + 1.5 * n * b + (h - 1) * an + k * n * (c.p - k) / c.p * bn


@ALLTOALL.register("hier", cost=hier_alltoall_cost, overhead=80e-6)
def hier_alltoall(comm, send, scounts, sdispls):
    t = topology.of(comm)
    if t is None or t.nodes == 1:
        return pairwise(comm, send, scounts, sdispls)
    p, r = comm.Get_size(), comm.Get_rank()
    node, kn = t.node_comm, t.sizes[t.node]
    mates = t.members[t.node]
    # 0. every node-mate's send counts (int64 [kn, p])
    mine = np.asarray(scounts, np.int64)
    C = np.empty((kn, p), np.int64)
    node.Allgather(mine, C)
    sd = np.asarray(sdispls, np.int64)
    lists = _lists(t)
    # 1. inside: to node-mate x, my blocks for x itself and for everyone x forwards to
    lr = t.local_rank
    L = lists[lr]
    seg = C[:, L].sum(axis=1)  # bytes each node-mate sends me
    sdis = np.concatenate(([0], np.cumsum(seg)[:-1]))
    stage = np.empty(int(seg.sum()), np.uint8)
    reqs, outs = [], []
    for i, x in enumerate(mates):
        if i == lr:
            pack(send, sd[L], mine[L], stage[sdis[i]:sdis[i] + seg[i]])
            continue
        reqs.append(node.Irecv(stage[sdis[i]:sdis[i] + seg[i]], i, TAG_NODE))
        li = lists[i]
        out = np.empty(int(mine[li].sum()), np.uint8)
        pack(send, sd[li], mine[li], out)
        outs.append(out)
        reqs.append(node.Isend(out, i, TAG_NODE))
    waitall(reqs)
    # 2. across: to every destination I forward to, one message from my whole node
    off = sdis[:, None] + np.concatenate((np.zeros((kn, 1), np.int64), np.cumsum(C[:, L], axis=1)[:, :-1]), axis=1)
    for j, d in enumerate(L[1:], start=1):
        hdr = np.ascontiguousarray(C[:, d])
        msg = np.empty(8 * kn + int(hdr.sum()), np.uint8)
        msg[:8 * kn] = hdr.view(np.uint8)
        pack(stage, np.ascontiguousarray(off[:, j]), hdr, msg[8 * kn:])
        outs.append(msg)
        reqs.append(comm.Isend(msg, int(d), TAG_NET))
    return _collect(t, comm, r, C[:, r], stage, sdis, reqs)


def _lists(t) -> list:
    """For every node-mate x (local order): [x] + the destinations on other nodes whose blocks x
    forwards (local rank j on its node -> local rank j mod k of this node), as int64 arrays.
    A pure function of the agreed topology, computed once per communicator."""
    got = t.__dict__.get("_a2a_lists")
    if got is None:
        a, ka = t.node, t.sizes[t.node]
        got = [np.asarray([x] + [d for d in range(len(t.node_of)) if t.node_of[d] != a and t.local_of[d] % ka == i],
                          np.int64) for i, x in enumerate(t.members[a])]
        t.__dict__["_a2a_lists"] = got
    return got


def _collect(t, comm, r, own, stage, sdis, reqs):
    """Receive the forwarders' messages and assemble the result in group-rank order."""
    MPI = mpi.MPI
    p = comm.Get_size()
    rcounts = np.zeros(p, np.int64)
    pieces = {}  # source group rank -> (array, offset)
    for i, s in enumerate(t.members[t.node]):  # own node: the first block of each node-mate's part
        rcounts[s] = own[i]
        pieces[s] = (stage, int(sdis[i]))
    status = MPI.Status()
    for a, srcs in enumerate(t.members):
        if a == t.node:
            continue
        fw = srcs[t.local_rank % len(srcs)]
        msg = comm.Mprobe(fw, TAG_NET, status)
        buf = np.empty(status.Get_count(MPI.BYTE), np.uint8)
        msg.Recv(buf)
        hdr = buf[:8 * len(srcs)].view(np.int64)
        o = 8 * len(srcs)
        for s, n in zip(srcs, hdr.tolist()):
            rcounts[s] = n
            pieces[s] = (buf, o)
            o += n
    recv = np.empty(int(rcounts.sum()), np.uint8)
    o = 0
    for s in range(p):
        n = int(rcounts[s])
        src, at = pieces[s]
        recv[o:o + n] = src[at:at + n]
        o += n
    waitall(reqs)
    return recv, rcounts.tolist()
