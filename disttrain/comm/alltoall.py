"""AllToAll(v) on point-to-point: pairwise exchange and Bruck's algorithm, for uneven splits.

Both move raw bytes (the caller views any dtype as uint8), so one implementation serves every
dtype and row shape.

- pairwise: p-1 rounds; in round k rank r sends to r+k and receives from r-k (Thakur et al. 2005,
  sec. 3). Every byte moves once: the large-message algorithm.
- bruck: ceil(log2 p) rounds (Bruck et al. 1997, "Efficient algorithms for all-to-all
  communications in multiport message-passing systems"). Blocks are rotated so that position j
  holds data for rank r+j; in round k all positions with bit k set move to rank r+2^k. Each byte
  moves up to log2 p times, but there are only log2 p messages: the small-message algorithm. With
  uneven splits an intermediate rank does not know the sizes of the blocks it forwards, so each
  round sends a small size header before the packed data.
"""
from __future__ import annotations

import math

import numpy as np

from .. import mpi

from . import cost
from .kernels import pack
from .p2p import TAG_BRUCK_DATA, TAG_BRUCK_SIZE, TAG_PAIRWISE, scratch, waitall
from .registry import ALLTOALL


#: Software cost of one Bruck round (Python and NumPy bookkeeping), measured with
#: scripts/bench_collectives.py --collective alltoall at p=2 on the development machine.
BRUCK_ROUND = 25e-6


def _ports(c):
    """(largest node's ranks k, alpha between nodes, beta through a node's port); on one node
    (k = 1) the intra-node alpha and no port."""
    if c.hosts <= 1:
        return 1, c.alpha, 0.0
    a, b = cost.net(c)
    return max(cost.node_sizes(c)), a, b


def pairwise_cost(c, n: float) -> float:
    """n: bytes one rank sends. One node: (p-1)(alpha + n/p beta). Several: k-1 messages inside,
    p-k across, and the k ranks of a node pushing k n (p-k)/p bytes through its port."""
    b = cost.bg(c, n)[0]
    k, an, bn = _ports(c)
    if c.hosts <= 1:
        return (c.p - 1) * (c.alpha + n / c.p * b)
    return (k - 1) * (c.alpha + n / c.p * b) + (c.p - k) * an + k * n * (c.p - k) / c.p * bn


def bruck_cost(c, n: float) -> float:
    """ceil(lg p) rounds of ~n/2 bytes and a size header; across nodes every round's messages
    cross a port shared by the node's k ranks."""
    lg = math.ceil(math.log2(max(2, c.p)))
    k, an, bn = _ports(c)
    b = cost.bg(c, n)[0] if c.hosts <= 1 else bn * k
    return lg * (BRUCK_ROUND + 2 * an + n / 2 * b)


@ALLTOALL.register("pairwise", cost=pairwise_cost, overhead=7e-6)
def pairwise(comm, send, scounts, sdispls):
    """Every send is posted first (to r+1, r+2, ...); the incoming sizes are then learnt by matched
    probes (MPI_Mprobe) from r-1, r-2, ..., so no separate exchange of counts is needed."""
    MPI = mpi.MPI
    p, r = comm.Get_size(), comm.Get_rank()
    sends = [comm.Isend(send[sdispls[d]:sdispls[d] + scounts[d]], d, TAG_PAIRWISE)
             for d in ((r + k) % p for k in range(1, p))]
    status = MPI.Status()
    msgs, rcounts = {}, [0] * p
    for k in range(1, p):
        src = (r - k) % p
        msgs[src] = comm.Mprobe(src, TAG_PAIRWISE, status)
        rcounts[src] = status.Get_count(MPI.BYTE)
    rcounts[r] = scounts[r]
    rdispls = [0] * p
    for i in range(1, p):
        rdispls[i] = rdispls[i - 1] + rcounts[i - 1]
    recv = np.empty(sum(rcounts), np.uint8)
    recv[rdispls[r]:rdispls[r] + rcounts[r]] = send[sdispls[r]:sdispls[r] + scounts[r]]
    for src, msg in msgs.items():
        msg.Recv(recv[rdispls[src]:rdispls[src] + rcounts[src]])
    waitall(sends)
    return recv, rcounts


@ALLTOALL.register("bruck", cost=bruck_cost)
def bruck(comm, send, scounts, sdispls):
    p, r = comm.Get_size(), comm.Get_rank()
    pos = (r + np.arange(p)) % p  # position j holds the block for rank r+j
    off, ln = np.asarray(sdispls, np.int64)[pos], np.asarray(scounts, np.int64)[pos]
    store = np.empty(max(64, 2 * send.shape[0]), np.uint8)  # received blocks are appended here
    store[:send.shape[0]] = send
    end = send.shape[0]
    j = np.arange(p)
    dist = 1
    while dist < p:
        sel = np.nonzero(j & dist)[0]
        to, frm = (r + dist) % p, (r - dist) % p
        sizes = ln[sel].copy()
        nsend = int(sizes.sum())
        sbuf = scratch(nsend, np.uint8, slot=2)
        pack(store, off[sel], sizes, sbuf)
        rsizes = np.empty_like(sizes)
        comm.Sendrecv(sizes, to, TAG_BRUCK_SIZE, rsizes, frm, TAG_BRUCK_SIZE)
        total = int(rsizes.sum())
        if end + total > store.shape[0]:
            grown = np.empty(max(2 * store.shape[0], end + total), np.uint8)
            grown[:end] = store[:end]
            store = grown
        comm.Sendrecv(sbuf[:nsend], to, TAG_BRUCK_DATA, store[end:end + total], frm, TAG_BRUCK_DATA)
        off[sel] = end + np.concatenate(([0], np.cumsum(rsizes)[:-1]))
        ln[sel] = rsizes
        end += total
        dist <<= 1
    src_pos = (r - np.arange(p)) % p  # the block from rank s ended at position r-s
    rcounts = ln[src_pos]
    recv = np.empty(int(rcounts.sum()), np.uint8)
    pack(store, off[src_pos], rcounts, recv)
    return recv, rcounts.tolist()

