"""Which ranks of a communicator share a node, and the sub-communicators two-level algorithms use.

A hierarchical collective (hier.py) works in two levels: inside each node (shared memory, fast)
and across nodes (the network, slow). It needs, agreed on every rank of the communicator:

- ``node_of[r]``: the node of group rank r. Nodes are numbered 0, 1, ... in order of their first
  member's group rank, from every rank's node key (``MPI_Comm_split_type(SHARED)``'s node, named
  by its lowest world rank) - one allgather, so every rank computes the same numbering;
- ``node_comm``: the ranks of this rank's node, in group-rank order (``local_rank`` = rank there);
- ``slice_comm``: local rank i of every node that has one, in node order ("slice" i). With k ranks
  on every node, slice i carries 1/k of the vector across the network, so every rank's network
  port is used (the design of NCCL's and Horovod's hierarchical allreduce); slice 0 holds the
  node leaders, used when the nodes hold different numbers of ranks.

**When the sub-communicators are created.** Creating a communicator is collective over its
parent, and MPI comm creation from two threads on overlapping communicators is an ordering
hazard (each thread's creation must match the same creation on every other rank). So topologies
are built only where groups are created - ``runtime.init`` and ``runtime.split``, in the caller's
thread, for the blocking communicator; the asynchronous communicator's topology is built on the
communication thread in queue order (``engine.call``), exactly as its own split is - and never
lazily inside a collective: a rank that never runs a hierarchical algorithm has taken part in
every creation anyway, and an asynchronous collective can never be creating one while the caller
creates another. Single-node communicators get no sub-communicators at all (nothing to build,
nothing to hazard). ``forget`` releases them with the group.

**Emulated nodes for tests.** ``DISTTRAIN_FAKE_NODES`` splits each real node further, by world
rank: ``K`` makes K blocks of consecutive world ranks (``np.array_split``; uneven allowed),
``a,b,c`` gives the blocks' sizes (they must add up to the world size). Group rank 0's value is
broadcast, so every rank applies the same split; a bad value is a CollectiveError on every rank.
The hierarchical code paths then run at 2-8 ranks on one machine.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .. import mpi
from ..errors import CollectiveError

_state: dict = {}  # communicator handle -> Topology


@dataclass(eq=False)
class Topology:
    """The node structure of one communicator (identical on every member but for the comms).

    Attributes:
        node_of: node index of every group rank (nodes numbered by first appearance).
        sizes: ranks on each node.
        node: this rank's node; local_rank: its rank among the node's ranks (group order).
        node_comm, slice_comm: sub-communicators (None on a single node).
        fake: the DISTTRAIN_FAKE_NODES spec in force ("" for the real nodes).
    """

    node_of: tuple
    sizes: tuple
    node: int
    local_rank: int
    node_comm: object = field(default=None, repr=False)
    slice_comm: object = field(default=None, repr=False)
    fake: str = ""

    @property
    def nodes(self) -> int:
        return len(self.sizes)

    @property
    def uniform(self) -> bool:
        """True when every node holds the same number of ranks (the slice algorithm applies)."""
        return len(set(self.sizes)) == 1

    @property
    def layout(self) -> str:
        """"HxK" for H nodes of K ranks, else the sizes joined by "+" ("2+1+3"): the cost-model key."""
        return f"{self.nodes}x{self.sizes[0]}" if self.uniform else "+".join(map(str, self.sizes))

    @property
    def crossings(self) -> int:
        """Ring edges (group rank r -> r+1) leaving the busiest node: how many of a flat ring's
        messages share one node's network port at every step (1 when nodes hold consecutive ranks)."""
        p = len(self.node_of)
        out = [0] * self.nodes
        for r in range(p):
            if self.node_of[r] != self.node_of[(r + 1) % p]:
                out[self.node_of[r]] += 1
        return max(out)

    @cached_property
    def members(self) -> tuple:
        """Group ranks of every node, ascending (= their order in the node communicator)."""
        return tuple(tuple(r for r, m in enumerate(self.node_of) if m == n) for n in range(self.nodes))

    @cached_property
    def local_of(self) -> tuple:
        """Local rank (index in its node) of every group rank."""
        out = [0] * len(self.node_of)
        for ranks in self.members:
            for i, r in enumerate(ranks):
                out[r] = i
        return tuple(out)

    def slice_members(self, i: int) -> tuple:
        """Group ranks of slice i (local rank i of every node that has one), ascending (= their
        order in the slice communicator, which is split with the group rank as key)."""
        return tuple(r for r, lr in enumerate(self.local_of) if lr == i)

    def free(self) -> None:
        for c in (self.node_comm, self.slice_comm):
            if c is not None:
                c.Free()
        self.node_comm = self.slice_comm = None


def _fake_key(spec: str, wrank: int, wsize: int):
    """(block of world rank `wrank` under `spec`, error or None)."""
    try:
        if "," in spec:
            sizes = [int(s) for s in spec.split(",")]
            if any(s < 1 for s in sizes) or sum(sizes) != wsize:
                raise ValueError
            bounds = np.cumsum(sizes)
        else:
            k = int(spec)
            if not 1 <= k <= wsize:
                raise ValueError
            bounds = np.cumsum([len(b) for b in np.array_split(np.arange(wsize), k)])
    except ValueError:
        return 0, (f"DISTTRAIN_FAKE_NODES={spec!r}: give a node count in [1, {wsize}] or ranks per node "
                   f"('2,1,3', positive, adding up to the world size {wsize})")
    return int(np.searchsorted(bounds, wrank, side="right")), None


def build(comm, like: "Topology | None" = None) -> Topology:
    """Find and record the topology of `comm` (collective over it; see the module docstring for
    where it may be called). `like`: the topology of a communicator with the same members in the
    same order (the group's blocking one) - then only the sub-communicators are created."""
    if like is None:
        like = _discover(comm)
    t = Topology(like.node_of, like.sizes, like.node, like.local_rank, fake=like.fake)
    if t.nodes > 1:
        r = comm.Get_rank()
        t.node_comm = comm.Split(t.node, r)
        t.slice_comm = comm.Split(t.local_rank, r)
    _state[comm.handle] = t
    return t


def _discover(comm) -> Topology:
    MPI = mpi.MPI
    shared = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:  # the real node, named by its lowest world rank (the same name on every member)
        real = shared.allreduce(MPI.COMM_WORLD.Get_rank(), op=MPI.MIN)
    finally:
        shared.Free()
    # one allgather: every member's real node and world rank, and group rank 0's fake-node spec
    # (which decides for everyone: an environment that differs on one host splits nobody apart)
    keys = comm.allgather((real, MPI.COMM_WORLD.Get_rank(), os.environ.get("DISTTRAIN_FAKE_NODES", "").strip()))
    spec, wsize = keys[0][2], MPI.COMM_WORLD.Get_size()
    fake = [_fake_key(spec, w, wsize) if spec else (0, None) for _, w, _ in keys]
    if fake and fake[0][1]:
        raise CollectiveError(fake[0][1])
    number: dict = {}
    node_of = tuple(number.setdefault((k[0], f[0]), len(number)) for k, f in zip(keys, fake))
    r = comm.Get_rank()
    sizes = tuple(int(s) for s in np.bincount(node_of, minlength=len(number)))
    local = sum(1 for q in range(r) if node_of[q] == node_of[r])
    return Topology(node_of, sizes, node_of[r], local, fake=spec)


def of(comm) -> "Topology | None":
    """The recorded topology of `comm` (None for a communicator disttrain did not create)."""
    return _state.get(comm.handle)


def forget(*comms) -> None:
    """Release the topologies of communicators about to be freed (collective over each)."""
    for c in comms:
        t = _state.pop(c.handle, None)
        if t is not None:
            t.free()
