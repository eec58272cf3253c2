"""Hierarchical (two-level) AllReduce for ranks spread over several nodes.

A flat ring over p ranks on h nodes pushes 2(p-1)/p of the vector through every node's network
port. Two levels push 2(h-1)/h (Thakur, Rabenseifner & Gropp 2005 on SMP-aware collectives; the
"2D" / hierarchical allreduce of Horovod and NCCL, Sergeev & Del Balso 2018; Jia et al. 2018):

1. inside each node, reduce-scatter: local rank i ends with block i (1/k of the vector) summed
   over its node (the node communicator; ring or the library, by the same rule as
   ``dt.reduce_scatter``'s auto);
2. across nodes, allreduce among the slices: local rank i of every node reduces block i with its
   peers of the other nodes - k concurrent allreduces of n/k bytes, so every rank's link carries
   its share and the port carries 2(h-1)/h n in all (the ring, or the library for small slices);
3. inside each node, allgather the k blocks.

Nodes holding different numbers of ranks have no equal slices: then the node leaders carry the
whole vector (reduce to the leader, allreduce among the leaders, broadcast from it) - the same
2(h-1)/h n through each port, on one rank per node. Every block is reduced by one process at each
level and the rest are copies, so every rank ends with the same bits.

The sub-communicators come from comm/topology.py (built when the group was created). A
communicator disttrain did not create has no recorded topology and a single-node one has no
second level: there the algorithm runs the inter-node choice on the whole communicator (correct,
flat). ``auto`` never picks "hier" on one node (its cost is infinite there).
"""
from __future__ import annotations

import math
import threading

import numpy as np

from .. import mpi
from . import config, cost, topology
from .costmodel import choose, params_of
from .ops import mpi_op
from .p2p import blocks
from .registry import ALLGATHER, ALLREDUCE, REDUCE_SCATTER
from .ring import ring_cost

#: The second level's algorithm: the ring (segmented, its transfers pipelined with the
#: reductions) for bandwidth-bound slices, the library below INTER_LATENCY_BOUND bytes per slice.
#: Rabenseifner has the ring's bytes and fewer latencies on paper, but its whole-half blocking
#: exchanges leave the link idle while they reduce: on the emulated cluster (2 x 2, 1 Gbit/s,
#: 64 MiB, 16 MiB chunks) "hier" took 0.98 s with it between hosts and 0.66 s with the ring.
INTER = {"ring": ring_cost}
INTER_LATENCY_BOUND = 64 << 10
#: chunk of the pipelined slice algorithm (see _slices): the node phases of one chunk hide behind
#: the network phase of another; measured there, 16 MiB chunks beat 4 MiB ones (2 x 2, 64 MiB:
#: 0.66 vs 0.74 s; 3 x 2: 0.88 vs 0.98 s) - fewer stops and restarts of the link
PIPELINE_BYTES = 16 << 20


def _net_params(c, h: int, k: int):
    """Cost parameters of one slice: h ranks, one per node, k slices sharing each port."""
    a, b = cost.net(c)
    return cost.CostParams(h, alpha=a, beta=b * k, beta_large=b * k, gamma=c.gamma, gamma_large=c.gamma_large)


def inter_algorithm(c, n: float) -> str:
    """The second level's algorithm for an n-byte allreduce (a pure function of agreed values)."""
    h, k = shape(c)
    if n / k < INTER_LATENCY_BOUND or h < 2:
        return "mpi"
    cn = _net_params(c, h, k)
    return min(INTER, key=lambda a: INTER[a](cn, n / k))


def shape(c) -> tuple[int, int]:
    """(nodes, ranks per node used by the second level: k if uniform, else 1 - the leaders)."""
    sizes = cost.node_sizes(c)
    return max(1, c.hosts), (sizes[0] if len(set(sizes)) == 1 else 1)


def hier_cost(c, n: float) -> float:
    """intra reduce-scatter + allgather (ring on k ranks: 2(k-1)(alpha + n/k beta) + (k-1)/k n gamma)
    + the best inter-node allreduce of n/k bytes among h ranks whose k slices share each port
    (ring: 2(h-1)/h n beta_net). Uneven nodes: a pipelined reduce + broadcast inside
    (2 (lg k alpha + n beta) + n gamma) and the leaders' allreduce of n. Infinite on one node:
    there is no second level."""
    if c.hosts <= 1:
        return math.inf
    h, k = shape(c)
    b, g = cost.bg(c, n)
    cn = _net_params(c, h, k)
    inter = min(f(cn, n / k) for f in INTER.values())
    if k > 1:
        intra = 2 * (k - 1) * (c.alpha + n / k * b) + (k - 1) / k * n * g
    else:  # leaders: the largest node's reduce and broadcast trees
        kmax = max(2, *cost.node_sizes(c))
        intra = 2 * (math.ceil(math.log2(kmax)) * c.alpha + n * b) + n * g
    return intra + inter


@ALLREDUCE.register("hier", cost=hier_cost, overhead=150e-6)
def hier(comm, buf: np.ndarray, op: int) -> None:
    p, n = comm.Get_size(), buf.shape[0]
    if p == 1 or n == 0:
        return
    t = topology.of(comm)
    c = params_of(comm)
    if t is None or t.nodes == 1:
        ALLREDUCE.resolve(inter_algorithm(c, buf.nbytes))(comm, buf, op)
    elif t.uniform:
        _slices(t, c, buf, op)
    else:
        _leaders(t, c, buf, op)


def _slices(t, c, buf, op) -> None:
    """Equal slices: reduce-scatter in the node, allreduce block i among slice i, allgather.

    A vector of two PIPELINE_BYTES chunks or more is pipelined: a helper thread runs the node
    phases (reduce-scatter of chunk j+1, allgather of chunk j-1) on the node communicator while
    this thread runs chunk j's slice allreduce on the slice communicator - so the network, the
    bottleneck, rarely waits for memory. Two threads on two communicators is what
    MPI_THREAD_MULTIPLE allows; every rank cuts the same chunks, so the orders match."""
    n, item = buf.shape[0], buf.itemsize
    per = max(1, PIPELINE_BYTES // item)
    chunks = [(o, min(per, n - o)) for o in range(0, n, per)]
    node, k = t.node_comm, t.sizes[0]
    rs = REDUCE_SCATTER.resolve(choose("reduce_scatter", node, min(n, per) * item, buf.dtype))
    ag = ALLGATHER.resolve(choose("allgather", node, min(n, per) * item, buf.dtype))
    inter = [ALLREDUCE.resolve(inter_algorithm(c, m * item)) for _, m in chunks]
    blocks_of = [blocks(m, k) for _, m in chunks]
    lr = t.local_rank

    def scatter(j):  # chunk j's block lr, reduced over the node, in place in buf
        (o, m), (counts, displs) = chunks[j], blocks_of[j]
        part = buf[o:o + m]
        block = rs(node, part, op, counts, displs)
        lo = displs[lr]
        if not np.shares_memory(block, part):
            part[lo:lo + counts[lr]] = block
        return part[lo:lo + counts[lr]]

    def gather(j):
        (o, m), (counts, displs) = chunks[j], blocks_of[j]
        ag(node, buf[o:o + m], counts, displs)

    if len(chunks) < 2:
        block = scatter(0)
        inter[0](t.slice_comm, block, op)
        gather(0)
        return
    _pipeline(len(chunks), scatter, lambda j, block: inter[j](t.slice_comm, block, op), gather)


def _pipeline(nchunks: int, scatter, across, gather) -> None:
    """scatter(j) -> across(j, block) -> gather(j) for every chunk: the node phases on a helper
    thread in one fixed order on every rank (s0 s1 g0 s2 g1 s3 g2 ...: at most two chunks ahead
    of the network), the network phase here. An error on either side ends both and is raised."""
    snap = config.current()
    scattered = [threading.Event() for _ in range(nchunks)]
    crossed = [threading.Event() for _ in range(nchunks)]
    blocks_ = [None] * nchunks
    errors: list = []

    def helper():
        try:
            with config.bound(snap):  # the caller's settings (segment sizes) on every rank alike
                for j in range(nchunks + 1):
                    if j < nchunks:
                        blocks_[j] = scatter(j)
                        scattered[j].set()
                    if j > 0:
                        crossed[j - 1].wait()
                        if errors:
                            return
                        gather(j - 1)
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller
            errors.append(e)
        finally:
            for ev in scattered:
                ev.set()

    th = threading.Thread(target=helper, name="disttrain-hier", daemon=True)
    th.start()
    try:
        for j in range(nchunks):
            scattered[j].wait()
            if errors:
                break
            across(j, blocks_[j])
            crossed[j].set()
    except BaseException as e:  # noqa: BLE001
        errors.append(e)
    finally:
        for ev in crossed:
            ev.set()
        th.join()
    if errors:
        raise errors[0]


def _leaders(t, c, buf, op) -> None:
    """Uneven nodes: reduce to each node's leader, allreduce among the leaders, broadcast."""
    MPI = mpi.MPI
    node = t.node_comm
    if node.Get_size() > 1:
        if t.local_rank == 0:
            node.Reduce(MPI.IN_PLACE, buf, op=mpi_op(op), root=0)
        else:
            node.Reduce(buf, None, op=mpi_op(op), root=0)
    if t.local_rank == 0:
        ALLREDUCE.resolve(inter_algorithm(c, buf.nbytes))(t.slice_comm, buf, op)
    if node.Get_size() > 1:
        node.Bcast(buf, root=0)
