"""Hierarchical allgather, reduce-scatter (comm/hier_gather.py) and node-aggregated alltoall(v)
(comm/hier_alltoall.py) on emulated nodes, against the MPI library's own collectives.

DISTTRAIN_FAKE_NODES splits this machine by world rank when a group is created; groups whose rank
order interleaves the nodes make the ranks of a node non-consecutive in the group, so the
regrouping by slice and the order of the result blocks are under test. Layouts: one node (the
flat fallback), equal nodes (slices), uneven nodes (leaders), one rank per node.
"""
import numpy as np
import pytest

import disttrain as dt
from disttrain.comm import costmodel, lowlevel, topology
from disttrain.comm.cost import CostParams
from disttrain.comm.registry import ALLTOALL

from .conftest import rank_rng
from .test_allreduce import DTYPES, OPS, integer_data, oracle
from .test_hier import group_with, specs


def orders(p):
    """Group rank orders over all p world ranks: natural, reversed, evens then odds (interleaves
    every block layout: a node's ranks are not consecutive in the group)."""
    return [list(range(p)), list(reversed(range(p))), list(range(0, p, 2)) + list(range(1, p, 2))]


def layouts(comm, monkeypatch):
    """(label, group, full) for every fake-node spec and rank order, plus a group over part of the
    nodes; `full`: the interleaved order and the partial group, where the tests run their whole
    dtype/op matrix (the other orders a corner of it: the suite runs at 1-8 ranks in minutes)."""
    p = comm.Get_size()
    for spec in specs(p):
        for i, ranks in enumerate(orders(p)):
            with group_with(monkeypatch, spec, ranks) as g:
                yield f"{spec} {ranks}", g, i == 2
    g = group_with(monkeypatch, "2" if p >= 2 else "1", list(range(1, p)) or [0])
    if g.is_member:
        yield "part", g, True
    g.free()


def cases(comm, monkeypatch, dtypes, few, sizes):
    """(label, group, dtype, size) over every layout: all `dtypes` where the layout runs the full
    matrix, the `few` elsewhere."""
    for spec, g, full in layouts(comm, monkeypatch):
        for dtype in dtypes if full else few:
            for n in sizes:
                yield spec, g, dtype, n


def everywhere(comm, failures, what):
    failures = sum(comm.allgather(failures), [])  # every rank reports every rank's mismatches
    assert not failures, f"{what}: {failures[:8]}"


@pytest.mark.mpi
def test_reduce_scatter_every_layout_dtype_op_against_the_library(comm, monkeypatch):
    rng = rank_rng(comm, 31)
    failures = []
    for spec, g, full in layouts(comm, monkeypatch):
        q, r = g.size, g.rank
        for dtype in DTYPES if full else [np.int32, np.float64]:
            for op in OPS if full else ["sum", "max"]:
                for rows in (0, 1, q - 1, q + 1, 37):
                    x = integer_data(rng, rows * 3, dtype, op).reshape(rows, 3)
                    whole = oracle(g.comm, x, op)  # MPI_Allreduce, then rank r's np.array_split block
                    want = np.array_split(whole, q, axis=0)[r]
                    got = dt.reduce_scatter(x, op=op, algorithm="hier", group=g)
                    if got.shape != want.shape or not np.array_equal(got, want):
                        failures.append((spec, np.dtype(dtype).name, op, rows))
    everywhere(comm, failures, "hier reduce_scatter vs MPI_Allreduce + array_split")


@pytest.mark.mpi
def test_allgather_uneven_rows_every_dtype_against_the_library(comm, monkeypatch):
    rng = rank_rng(comm, 32)
    failures = []
    for spec, g, dtype, most in cases(comm, monkeypatch, DTYPES + [np.uint8, np.complex128], [np.float32],
                                      (0, 1, 5, 300)):
        rows = int(rng.integers(0, most + 1))
        x = (rng.standard_normal((rows, 2, 3)) * 100).astype(dtype)
        want = np.concatenate(g.comm.allgather(x))  # the library's allgather of every rank's x
        got = dt.allgather(x, algorithm="hier", group=g)
        if got.dtype != want.dtype or not np.array_equal(got.view(np.uint8), want.view(np.uint8)):
            failures.append((spec, np.dtype(dtype).name, most))
    everywhere(comm, failures, "hier allgather vs MPI_Allgather")


@pytest.mark.mpi
def test_alltoallv_random_splits_zero_blocks_against_the_library(comm, monkeypatch):
    rng = rank_rng(comm, 33)
    failures = []
    for spec, g, dtype, most in cases(comm, monkeypatch, (np.float16, np.int32, np.float64, np.uint8), (np.int32,),
                                      (0, 1, 4, 200, "empty")):
        q = g.size
        if most == "empty":  # nothing anywhere
            y, s = dt.alltoall(np.zeros((0, 4), np.float32), algorithm="hier", group=g)
            if y.shape != (0, 4) or list(s) != [0] * q:
                failures.append((spec, "empty"))
            continue
        splits = rng.integers(0, most + 1, q)
        splits[rng.integers(0, q)] = 0  # at least one empty block
        x = rng.integers(0, 1 << 7, (int(splits.sum()), 3)).astype(dtype)
        # the library: MPI_Alltoallv with counts exchanged by MPI_Alltoall
        rc = np.array(g.comm.alltoall(splits.tolist()), np.int64)
        want = np.empty((int(rc.sum()), 3), dtype)
        sb, rb = x.view(np.uint8).reshape(-1), want.view(np.uint8).reshape(-1)
        row = 3 * np.dtype(dtype).itemsize
        g.comm.Alltoallv([sb, (splits * row, np.concatenate(([0], np.cumsum(splits)[:-1])) * row)],
                         [rb, (rc * row, np.concatenate(([0], np.cumsum(rc)[:-1])) * row)])
        got, got_splits = dt.alltoall(x, splits, algorithm="hier", group=g)
        if list(got_splits) != rc.tolist() or not np.array_equal(got, want):
            failures.append((spec, np.dtype(dtype).name, most))
    everywhere(comm, failures, "hier alltoallv vs MPI_Alltoallv")


@pytest.mark.mpi
def test_zero_path_lowlevel_and_async_communicator(comm, monkeypatch):
    """The calls ZeRO makes (lowlevel reduce_scatter_on / allgather_on on float buffers with
    element counts), on the group's asynchronous communicator through the communication thread."""
    p = comm.Get_size()
    with group_with(monkeypatch, "2" if p >= 2 else "1", orders(p)[2]) as g:
        n = 10 * p + 3
        counts, displs = lowlevel.blocks(n, g.size)
        x = np.arange(n, dtype=np.float64) * (g.rank + 1)
        total = sum(range(1, g.size + 1))

        def run():
            a = x.copy()
            block = lowlevel.reduce_scatter_on(g.async_comm, a, counts, displs, "avg", algorithm="hier")
            b = np.zeros(n)
            lo = displs[g.rank]
            b[lo:lo + counts[g.rank]] = block
            lowlevel.allgather_on(g.async_comm, b, counts, displs, algorithm="hier")
            return b

        got = lowlevel.submit(run, "zero-like", group=g).wait()
        assert topology.of(g.async_comm) is not None
        assert np.allclose(got, np.arange(n) * total / g.size, rtol=1e-12)


@pytest.mark.mpi
def test_auto_picks_the_two_level_algorithms_across_nodes_and_never_on_one(comm, monkeypatch):
    p = comm.Get_size()
    u8 = np.dtype(np.uint8)
    for fam in ("allgather", "reduce_scatter", "alltoall"):
        one = [costmodel.choose(fam, dt.world().comm, 1 << k, u8) for k in range(27)]
        assert "hier" not in one, (fam, one)  # the world is one node here
    if p >= 4 and p % 2 == 0:
        with group_with(monkeypatch, "2", orders(p)[2]) as g:  # 2 nodes, interleaved, defaults
            picks = {fam: [costmodel.choose(fam, g.comm, 1 << k, u8) for k in range(27)]
                     for fam in ("allgather", "reduce_scatter")}
            # the library below 256 KiB (its latency wins there), hier from 256 KiB
            assert all(v[:18] == ["mpi"] * 18 and v[18:] == ["hier"] * 9 for v in picks.values()), picks
            assert comm.allgather(picks) == [picks] * p
    # the rule: many ranks per node and small blocks make the node-aggregated alltoall win
    c = CostParams(64, hosts=8, layout="8x8")
    assert costmodel._decide("alltoall", c, 64 << 10) == "hier"
    c = CostParams(4, hosts=4, layout="4x1")  # one rank per node: nothing to aggregate
    assert all(costmodel._decide("alltoall", c, 1 << k) != "hier" for k in range(27))


@pytest.mark.mpi
def test_alltoallv_auto_agrees_when_ranks_send_very_different_amounts(comm):
    """"auto" sizes an alltoallv by the largest send of any rank: ranks whose own totals fall on
    different sides of an algorithm switch still run the same algorithm (else: a hang)."""
    p = comm.Get_size()
    r = comm.Get_rank()
    splits = [(1 << 16) if r == 0 else 0] * p  # rank 0 sends 64 Ki rows to everyone, the rest nothing
    x = np.full((sum(splits), 1), r, np.int8)
    y, got = dt.alltoall(x, splits)
    assert got == [(1 << 16) if i == 0 else 0 for i in range(p)] and np.all(y == 0)
    picks = comm.allgather(costmodel.choose("alltoall", dt.world().comm,
                                            costmodel.agreed_bytes(dt.world().comm, x.nbytes), np.dtype(np.uint8)))
    assert picks == [picks[0]] * p


@pytest.mark.mpi
def test_sharded_embeddings_get_the_hierarchical_alltoall_through_auto(comm, monkeypatch):
    """DLRM's sharded embeddings call dt.alltoall(algorithm="auto"): on a multi-node group whose
    parameters make the node-aggregated exchange cheaper it runs "hier", with the same results as
    the flat exchange."""
    from disttrain.parallel.embedding import ShardedEmbeddings

    p = comm.Get_size()
    calls = []
    hier = ALLTOALL._fns["hier"]
    monkeypatch.setitem(ALLTOALL._fns, "hier", lambda *a: calls.append(1) or hier(*a))
    monkeypatch.setattr(ALLTOALL, "_resolved", {})
    rng = rank_rng(comm, 34)
    with group_with(monkeypatch, "2" if p >= 2 else "1", orders(p)[2]) as g:
        c = costmodel.params_of(g.comm)
        if c.hosts > 1:  # a slow, high-latency network: aggregation wins at these sizes
            costmodel.install(CostParams(g.size, hosts=c.hosts, layout=c.layout, crossings=c.crossings,
                                         alpha_inter=5e-3, beta_inter=1e-9), g.comm, g.async_comm)
        outs = []
        ids = rng.integers(0, 7, (int(rng.integers(0, 9)), 3))  # uneven batches, empty ones too
        for algorithm in ("auto", "pairwise"):
            emb = ShardedEmbeddings([50, 7, 30], 4, group=g, sharding="row", seed=5, algorithm=algorithm)
            y = emb.forward(ids)
            emb.backward(np.ones_like(y))
            outs.append((y, emb.parameters()[0].grad.copy()))
        assert np.array_equal(outs[0][0], outs[1][0]) and np.array_equal(outs[0][1], outs[1][1])
        t = topology.of(g.comm)
        if g.size - max(t.sizes) > t.nodes - 1:  # fewer network messages per rank: auto must take it
            assert calls, "auto did not run the hierarchical alltoall"
        else:  # one node, or as many nodes as network partners (2 + 1): nothing to aggregate
            assert not calls
