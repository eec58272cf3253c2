"""Parameter-server AllReduce: workers push their data to server shards, which reduce and send the
result back (Li et al. 2014, "Scaling distributed machine learning with the parameter server").

With S servers the vector is cut into S shards (np.array_split); server j lives on rank j*p//S and
reduces shard j from all p ranks in rank order (deterministic), then returns it to everyone. With
the default S = p every rank serves one shard - the "direct" all-to-all reduce-scatter +
allgather. With S < p each server receives (p-1)*n/S elements while the other ranks' links idle:
the pattern's classic bottleneck, which the benchmark shows.
Choose S with ``algorithm="ps:S"`` or ``DISTTRAIN_PS_SERVERS``.
"""
from __future__ import annotations

from . import config, cost
from .kernels import reduce_into
from .p2p import TAG_PS_PULL, TAG_PS_PUSH, blocks, scratch, waitall
from .registry import ALLREDUCE


def server_ranks(p: int, servers: int) -> list:
    s = min(max(1, servers), p)
    return [j * p // s for j in range(s)]


def ps_cost(c, n: float, servers: int = 0) -> float:
    """2(p-1) alpha + (p-1) n/S (2 beta + gamma) with S servers: each server receives, reduces and
    returns its n/S share from p-1 workers."""
    p, (b, g) = c.p, cost.bg(c, n)
    s = min(p, servers or config.current().ps_servers or p)
    return 2 * (p - 1) * c.alpha + (p - 1) * n / s * (2 * b + g)


@ALLREDUCE.register("ps", takes_param=True, cost=ps_cost, overhead=20e-6)
def ps(comm, buf, op: int, param: int | None = None) -> None:
    p, r, n = comm.Get_size(), comm.Get_rank(), buf.shape[0]
    if p == 1 or n == 0:
        return
    srv = server_ranks(p, param or config.current().ps_servers or p)
    counts, displs = blocks(n, len(srv))
    shard = srv.index(r) if r in srv else -1
    others = [q for q in range(p) if q != r]
    pushes_in, pulls_out = [], []
    if shard >= 0 and counts[shard]:
        c = counts[shard]
        tmp = scratch(c * (p - 1), buf.dtype, slot=2)
        pushes_in = [comm.Irecv(tmp[i * c:(i + 1) * c], q, TAG_PS_PUSH) for i, q in enumerate(others)]
    pushes_out = [comm.Isend(buf[displs[j]:displs[j] + counts[j]], s, TAG_PS_PUSH)
                  for j, s in enumerate(srv) if s != r and counts[j]]
    if pushes_in:
        c, own = counts[shard], buf[displs[shard]:displs[shard] + counts[shard]]
        for i, req in enumerate(pushes_in):
            req.Wait()
            reduce_into(own, tmp[i * c:(i + 1) * c], op)
        pulls_out = [comm.Isend(own, q, TAG_PS_PULL) for q in others]
    waitall(pushes_out)  # our pushed shards must leave before the results land in the same memory
    pulls_in = [comm.Irecv(buf[displs[j]:displs[j] + counts[j]], s, TAG_PS_PULL)
                for j, s in enumerate(srv) if s != r and counts[j]]
    waitall(pulls_in)
    waitall(pulls_out)
