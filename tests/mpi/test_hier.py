"""Topology (comm/topology.py) and the two-level allreduce (comm/hier.py) on emulated nodes.

DISTTRAIN_FAKE_NODES splits this machine's one node by world rank when a group is created, so
every code path - equal slices, node leaders for uneven nodes, one rank per node, groups that take
parts of nodes - runs at 1-8 ranks. Oracle: MPI_Allreduce on the same data (test_allreduce.oracle).
"""
import numpy as np
import pytest

import disttrain as dt
from disttrain.comm import costmodel, topology
from disttrain.comm.errors import CollectiveError

from .conftest import rank_rng
from .test_allreduce import DTYPES, OPS, TOL, integer_data, oracle


def specs(p):
    """Fake-node layouts for p ranks: equal, uneven (counts and explicit sizes), one per node."""
    out = ["1", str(p)]
    if p >= 4 and p % 2 == 0:
        out.append("2")
    if p >= 3:
        out += ["2" if p % 2 else "3", ",".join(["1"] + ["2"] * ((p - 1) // 2) + ["1"] * ((p - 1) % 2))]
    return list(dict.fromkeys(out))


def group_with(monkeypatch, spec, ranks):
    monkeypatch.setenv("DISTTRAIN_FAKE_NODES", spec)
    try:
        return dt.new_group(ranks)
    finally:
        monkeypatch.delenv("DISTTRAIN_FAKE_NODES")


def expected_nodes(spec, p):
    """Node of every world rank under `spec`, numbered 0.. in world-rank order."""
    sizes = [int(s) for s in spec.split(",")] if "," in spec else [len(b) for b in np.array_split(range(p), int(spec))]
    return [i for i, s in enumerate(sizes) for _ in range(s)]


@pytest.mark.mpi
def test_topology_is_agreed_and_matches_the_emulated_nodes(comm, monkeypatch):
    p = comm.Get_size()
    for spec in specs(p):
        for ranks in (list(range(p)), list(reversed(range(p))), list(range(0, p, 2))):
            g = group_with(monkeypatch, spec, ranks)
            if not g.is_member:
                g.free()
                continue
            t = topology.of(g.comm)
            world_nodes = expected_nodes(spec, p)
            first = {}
            want = tuple(first.setdefault(world_nodes[w], len(first)) for w in ranks)
            assert t.node_of == want and sum(t.sizes) == g.size, (spec, ranks, t)
            assert g.comm.allgather((t.node_of, t.sizes, t.layout)) == [(t.node_of, t.sizes, t.layout)] * g.size
            if t.nodes > 1:
                assert t.node_comm.Get_size() == t.sizes[t.node] and t.node_comm.Get_rank() == t.local_rank
                assert t.slice_comm.Get_size() == sum(1 for s in t.sizes if s > t.local_rank)
            else:
                assert t.node_comm is None and t.slice_comm is None  # nothing built on one node
            a = topology.of(g.async_comm)
            assert a.node_of == t.node_of and (a.slice_comm is None) == (t.slice_comm is None)
            c = costmodel.params_of(g.comm)
            assert (c.hosts, c.layout) == (t.nodes, t.layout)
            handles = (g.comm.handle, g.async_comm.handle)
            g.free()
            assert not set(handles) & set(topology._state), "released with the group"


@pytest.mark.mpi
def test_bad_fake_nodes_raise_on_every_rank(comm, monkeypatch):
    p = comm.Get_size()
    for spec in ("0", str(p + 1), "x", ",".join(["1"] * (p + 1))):
        with pytest.raises(CollectiveError, match="DISTTRAIN_FAKE_NODES"):
            group_with(monkeypatch, spec, range(p))
    dt.allreduce(np.ones(3))  # the world still works afterwards


@pytest.mark.mpi
def test_hier_exact_on_integer_data_every_layout_dtype_op(comm, monkeypatch):
    p = comm.Get_size()
    rng = rank_rng(comm, 21)
    failures = []
    for spec in specs(p):
        with group_with(monkeypatch, spec, range(p)) as g:
            for dtype in DTYPES:
                for op in OPS:
                    for n in (0, 1, p + 1, 1000):
                        x = integer_data(rng, n, dtype, op)
                        if not np.array_equal(dt.allreduce(x, op=op, algorithm="hier", group=g), oracle(comm, x, op)):
                            failures.append((spec, np.dtype(dtype).name, op, n))
    failures = sum(comm.allgather(failures), [])  # every rank reports every rank's mismatches
    assert not failures, f"hier vs MPI_Allreduce: {failures[:10]}"


@pytest.mark.mpi
def test_hier_random_floats_bit_identical_and_large_paths(comm, monkeypatch):
    """Floats within tolerance of the library, identical bits on every rank; sizes large enough
    for the ring reduce-scatter / allgather inside nodes and the ring or Rabenseifner between."""
    p = comm.Get_size()
    rng = rank_rng(comm, 22)
    for spec in specs(p):
        with group_with(monkeypatch, spec, range(p)) as g:
            for dtype, rtol in TOL.items():
                for n in (33, 5000, 100_001):
                    x = rng.standard_normal(n).astype(dtype)
                    got = dt.allreduce(x, algorithm="hier", group=g)
                    want = oracle(comm, x, "sum").astype(np.float64)
                    scale = comm.allreduce(np.abs(x).astype(np.float64)) + 1e-30
                    assert np.all(np.abs(got.astype(np.float64) - want) <= 4 * rtol * scale), (spec, dtype, n)
                    assert all(np.array_equal(e.view(np.uint8), got.view(np.uint8)) for e in comm.allgather(got))


@pytest.mark.mpi
def test_hier_on_groups_spanning_parts_of_nodes_async_and_in_place(comm, monkeypatch):
    p = comm.Get_size()
    spec = "2" if p >= 2 else "1"
    for ranks in (list(range(1, p)) or [0], list(reversed(range(p))), list(range(0, p, 2))):
        g = group_with(monkeypatch, spec, ranks)
        if g.is_member:
            x = np.arange(11, dtype=np.float64) * (comm.Get_rank() + 1)
            want = x / (comm.Get_rank() + 1) * sum(r + 1 for r in ranks)
            h = dt.allreduce_async(x, algorithm="hier", group=g)  # the asynchronous communicator's topology
            y = x.copy()
            assert dt.allreduce_(y, algorithm="hier", group=g) is y and np.array_equal(y, want)
            assert np.array_equal(h.wait(), want)
        g.free()


@pytest.mark.mpi
def test_auto_picks_hier_across_nodes_uncalibrated_and_never_on_one(comm, monkeypatch):
    p = comm.Get_size()
    f32 = np.dtype(np.float32)
    sizes = [1 << k for k in range(0, 27)]
    one = [costmodel.choose("allreduce", dt.world().comm, n, f32) for n in sizes]
    assert "hier" not in one, one  # the world is one node here
    if p >= 4 and p % 2 == 0:
        with group_with(monkeypatch, "2", range(p)) as g:  # 2 nodes x p/2 ranks, default parameters
            picks = [costmodel.choose("allreduce", g.comm, n, f32) for n in sizes]
            assert all(x == "hier" for x in picks[20:]), picks  # from 1 MiB
            assert comm.allgather(picks) == [picks] * p
    # the rule itself, for any calibrated link slower than a node's memory: 2 hosts x k ranks
    for k in (2, 3, 8):
        for b_net in (8e-9, 1e-9, 5e-10):  # 1, 8, 16 Gbit/s through a port (intra: 1.6e-10 s/B)
            c = costmodel.CostParams(2 * k, hosts=2, layout=f"2x{k}", beta_inter=b_net, alpha_inter=30e-6)
            assert costmodel.predict(c, "hier", 64 << 20) < costmodel.predict(c, "ring", 64 << 20), (k, b_net)
    c = costmodel.CostParams(4, hosts=4, layout="4x1")  # one rank per node: no second level to gain
    assert costmodel.predict(c, "hier", 64 << 20) >= costmodel.predict(c, "ring", 64 << 20)


@pytest.mark.mpi
def test_calibration_measures_inter_node_parameters_and_keys_the_cache_by_layout(comm, monkeypatch, lean_calibration):
    p = comm.Get_size()
    spec = "2" if p >= 2 else "1"
    with group_with(monkeypatch, spec, range(p)) as g:
        c = dt.calibrate(group=g)
        got = comm.allgather((c.alpha, c.beta, c.alpha_inter, c.beta_inter, c.layout))
        assert got == [got[0]] * p
        if p >= 2:
            assert c.alpha_inter > 0 and c.beta_inter > 0 and c.hosts == 2
            assert costmodel.cache_file(g.comm).endswith(f"-p{p}-hosts2-{c.layout}.json")
        else:
            assert c.alpha_inter == 0 and costmodel.cache_file(g.comm).endswith("-p1-hosts1.json")
        x = np.ones(4099, np.float32)
        assert np.all(dt.allreduce(x, group=g) == p)  # whatever auto picks now


@pytest.mark.mpi
def test_pipelined_slices_many_chunks_blocking_and_async_at_once(comm, monkeypatch):
    """Tiny pipeline chunks: the helper thread's node phases overlap the slice phase chunk after
    chunk, odd sizes, several ops; an asynchronous hier (its own topology, its own helper) in flight."""
    from disttrain.comm import hier

    p = comm.Get_size()
    monkeypatch.setattr(hier, "PIPELINE_BYTES", 256)  # 32 float64 / 64 float32 per chunk
    rng = rank_rng(comm, 23)
    with group_with(monkeypatch, "2" if p % 2 == 0 and p >= 2 else str(p), range(p)) as g:
        for rnd in range(6):
            n = comm.bcast(int(rng.integers(0, 400)) if rnd else 0, root=0)
            a = rng.integers(-9, 10, 2 * n + 3).astype(np.float32)
            h = dt.allreduce_async(a, op="max", algorithm="hier", group=g)
            for dtype, op in ((np.float64, "sum"), (np.int32, "min"), (np.int64, "prod")):
                x = integer_data(rng, n, dtype, op)
                got = dt.allreduce(x, op=op, algorithm="hier", group=g)
                assert comm.allreduce(int(not np.array_equal(got, oracle(comm, x, op)))) == 0, (rnd, dtype, op)
            assert np.array_equal(h.wait(), oracle(comm, a, "max")), rnd
