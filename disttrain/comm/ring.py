"""Ring AllReduce = ring reduce-scatter + ring allgather (Patarasuk & Yuan 2009; Thakur et al.
2005 sec. 4; the Baidu/Horovod "ring-allreduce").

Bandwidth-optimal: each rank sends and receives 2(p-1)/p * n elements in 2(p-1) steps. Each block
is cut into segments and the two phases are pipelined per segment: a segment is forwarded to the
right neighbour the moment it has been reduced, while the next segments are still in flight, so
reduction overlaps transfer. Receives are posted one step ahead into double buffers.
"""
from __future__ import annotations

import numpy as np

from .. import timeline
from . import config, cost
from .kernels import reduce_into
from .p2p import TAG_AG, TAG_RS, blocks, scratch, seg_elems, segments, waitall
from .registry import ALLGATHER, ALLREDUCE, REDUCE_SCATTER


def ring_reduce_scatter(comm, buf, op, counts, displs, seg, codec=None) -> None:
    """After return, block `rank` of buf (counts/displs) holds the reduction over all ranks.

    At step k rank r sends block (r-k-1) mod p right and receives block (r-k-2) mod p from the
    left, reduces it, and forwards it at step k+1; the last block received is its own, block r.

    With a `codec` (a narrower wire format, e.g. fp16/bf16 gradient compression) every segment is
    encoded just before it is sent and decoded-and-added on arrival: the data travels narrow while
    the running sums in `buf` stay in buf's (wider) dtype. `op` must then be SUM.
    """
    p, r = comm.Get_size(), comm.Get_rank()
    if p == 1:
        return
    right, left = (r + 1) % p, (r - 1) % p
    maxc = max(counts)
    wire = buf.dtype if codec is None else codec.wire_dtype
    tmps = (scratch(maxc, wire, slot=2), scratch(maxc, wire, slot=3))
    if codec is None:
        def send(o, n):
            return comm.Isend(buf[o:o + n], right, TAG_RS)

        def reduce(o, n, t):
            reduce_into(buf[o:o + n], t, op)
    else:  # every block is sent once per phase, so one encode buffer indexed like buf serves all sends
        enc = scratch(buf.shape[0], wire, slot=4)

        def send(o, n):
            codec.encode(buf[o:o + n], enc[o:o + n])
            return comm.Isend(enc[o:o + n], right, TAG_RS)

        def reduce(o, n, t):
            codec.accumulate(buf[o:o + n], t)

    def post(k):
        b = (r - k - 2) % p
        t, base = tmps[k % 2], displs[b]
        return [(comm.Irecv(t[o - base:o - base + n], left, TAG_RS), o, n)
                for o, n in segments(displs[b], counts[b], seg)]

    b0 = (r - 1) % p
    sends = [send(o, n) for o, n in segments(displs[b0], counts[b0], seg)]
    recvs = post(0)
    for k in range(p - 1):
        last = k == p - 2
        ahead = None if last else post(k + 1)
        t, base = tmps[k % 2], displs[(r - k - 2) % p]
        for req, o, n in recvs:
            req.Wait()
            reduce(o, n, t[o - base:o - base + n])
            if not last:
                sends.append(send(o, n))
        recvs = ahead
    waitall(sends)


def ring_allgather(comm, buf, counts, displs, seg) -> None:
    """Circulate every rank's block around the ring; a received segment is forwarded at once."""
    p, r = comm.Get_size(), comm.Get_rank()
    if p == 1:
        return
    right, left = (r + 1) % p, (r - 1) % p
    recvs = []
    for k in range(p - 1):  # every block lands in its own place: post all receives up front
        b = (r - k - 1) % p
        recvs.append([(comm.Irecv(buf[o:o + n], left, TAG_AG), o, n) for o, n in segments(displs[b], counts[b], seg)])
    sends = [comm.Isend(buf[o:o + n], right, TAG_AG) for o, n in segments(displs[r], counts[r], seg)]
    for k in range(p - 1):
        for req, o, n in recvs[k]:
            req.Wait()
            if k < p - 2:
                sends.append(comm.Isend(buf[o:o + n], right, TAG_AG))
    waitall(sends)


def ring_cost(c, n: float) -> float:
    """2(p-1)(alpha ceil(n/(p seg)) + n/p beta) + (p-1) n/p gamma: 2(p-1) steps of one block each,
    every segment a message; p-1 of the steps reduce."""
    p, (b, g) = c.p, cost.bg(c, n)
    return 2 * (p - 1) * (c.alpha * cost.segments(n / p) + n / p * b) + (p - 1) * n / p * g


@ALLREDUCE.register("ring", cost=ring_cost, overhead=25e-6)
def ring(comm, buf: np.ndarray, op: int) -> None:
    ring_allreduce(comm, buf, op)


def ring_allreduce(comm, buf: np.ndarray, op: int, codec=None) -> None:
    """Ring reduce-scatter, then ring allgather.

    With a `codec` (a narrow wire format; op must be SUM) the reduce-scatter encodes and
    decodes-and-adds per segment as described above; then each rank rounds its finished block to
    the wire format once and the allgather circulates the *encoded* blocks, so every rank decodes
    the very same bits: the result is identical on all ranks (as a plain allreduce's is), each
    element rounded to the wire format at most p times, and the sums accumulated in buf's dtype.
    """
    p = comm.Get_size()
    if p == 1 or buf.shape[0] == 0:
        return
    counts, displs = blocks(buf.shape[0], p)
    seg = seg_elems(buf, config.current().segment_bytes)
    with timeline.span("ring reduce-scatter", "phase"):
        ring_reduce_scatter(comm, buf, op, counts, displs, seg, codec)
    with timeline.span("ring allgather", "phase"):
        if codec is None:
            ring_allgather(comm, buf, counts, displs, seg)
            return
        enc = scratch(buf.shape[0], codec.wire_dtype, slot=4)
        o, n = displs[comm.Get_rank()], counts[comm.Get_rank()]
        codec.encode(buf[o:o + n], enc[o:o + n])
        ring_allgather(comm, enc, counts, displs, seg)
        codec.decode(enc, buf)


def ring_allgather_cost(c, n: float) -> float:
    """n: bytes of the gathered vector. (p-1) steps of one block: (p-1)(alpha ceil(n/(p seg)) + n/p beta)."""
    p, (b, _) = c.p, cost.bg(c, n)
    return (p - 1) * (c.alpha * cost.segments(n / p) + n / p * b)


def ring_reduce_scatter_cost(c, n: float) -> float:
    """The allgather's steps, each also reducing its block: + (p-1) n/p gamma."""
    return ring_allgather_cost(c, n) + (c.p - 1) * n / c.p * cost.bg(c, n)[1]


@REDUCE_SCATTER.register("ring", cost=ring_reduce_scatter_cost, overhead=25e-6)
def ring_rs(comm, buf, op, counts, displs):
    r = comm.Get_rank()
    counts, displs = tuple(int(c) for c in counts), tuple(int(d) for d in displs)
    ring_reduce_scatter(comm, buf, op, counts, displs, seg_elems(buf, config.current().segment_bytes))
    return buf[displs[r]:displs[r] + counts[r]]


@ALLGATHER.register("ring", cost=ring_allgather_cost, overhead=25e-6)
def ring_ag(comm, buf, counts, displs) -> None:
    counts, displs = tuple(int(c) for c in counts), tuple(int(d) for d in displs)
    ring_allgather(comm, buf, counts, displs, seg_elems(buf, config.current().segment_bytes))
