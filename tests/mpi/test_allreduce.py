"""Every allreduce algorithm against MPI_Allreduce: exact on integer-valued data, to a stated
tolerance on random floats; all dtypes, ops, awkward sizes, shapes, in-place, groups."""
import numpy as np
import pytest

import disttrain as dt
from disttrain.comm import config

from .conftest import rank_rng

ALGS = list(dt.ALLREDUCE_ALGORITHMS) + ["ps:2", "auto"]
DTYPES = [np.float16, np.float32, np.float64, np.int32, np.int64]
OPS = ["sum", "avg", "min", "max", "prod"]


def sizes(p):
    return [0, 1, 2, max(1, p - 1), p, p + 1, 7, 97, 1000, 4099]


def oracle(comm, x, op):
    """MPI's own Allreduce (on float32 for float16: "accumulate in float32"), then avg's division."""
    from mpi4py import MPI

    wide = np.dtype(np.float32 if x.dtype == np.float16 else x.dtype)
    y = np.empty(x.shape, wide)
    mop = {"sum": MPI.SUM, "avg": MPI.SUM, "min": MPI.MIN, "max": MPI.MAX, "prod": MPI.PROD}[op]
    comm.Allreduce(np.ascontiguousarray(x, dtype=wide), y, op=mop)
    if op == "avg":
        y = y / wide.type(comm.Get_size()) if wide.kind == "f" else y // comm.Get_size()
    return y.astype(x.dtype)


def integer_data(rng, n, dtype, op):
    lo, hi = (-2, 3) if op == "prod" else (-50, 51)  # products of up to 8 ranks stay exact
    return rng.integers(lo, hi, size=n).astype(dtype)


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ALGS)
def test_exact_on_integer_valued_data(comm, algorithm):
    rng = rank_rng(comm, 1)
    failures = []
    for dtype in DTYPES:
        for op in OPS:
            for n in sizes(comm.Get_size()):
                x = integer_data(rng, n, dtype, op)
                keep = x.copy()
                got = dt.allreduce(x, op=op, algorithm=algorithm)
                want = oracle(comm, x, op)
                if got.dtype != x.dtype or got.shape != x.shape or not np.array_equal(got, want):
                    failures.append((np.dtype(dtype).name, op, n))
                if not np.array_equal(x, keep):
                    failures.append(("input modified", np.dtype(dtype).name, op, n))
    assert not failures, f"{algorithm}: mismatches vs MPI_Allreduce at {failures[:10]}"


TOL = {np.float16: 2e-3, np.float32: 2e-6, np.float64: 1e-13}


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ALGS)
def test_random_floats_within_tolerance_and_identical_on_all_ranks(comm, algorithm):
    rng = rank_rng(comm, 2)
    for dtype, rtol in TOL.items():
        for n in (1, 33, 5000):
            x = rng.standard_normal(n).astype(dtype)
            got = dt.allreduce(x, op="sum", algorithm=algorithm)
            want = oracle(comm, x, "sum").astype(np.float64)
            scale = np.abs(comm.allreduce(np.abs(x).astype(np.float64))) + 1e-30  # sum of |x| bounds the error
            assert np.all(np.abs(got.astype(np.float64) - want) <= rtol * scale * 4), (dtype, n)
            everyone = comm.allgather(got)
            assert all(np.array_equal(e.view(np.uint8), got.view(np.uint8)) for e in everyone), \
                "ranks must end with bit-identical results (replicas would drift apart)"


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["ring", "tree", "double_tree", "rabenseifner", "ps"])
def test_many_pipeline_segments(comm, algorithm):
    config.update(segment_bytes=1024)  # 256 float32 per segment: exercise the pipelines' bookkeeping
    rng = rank_rng(comm, 3)
    for n in (255, 256, 257, 3 * 256 * comm.Get_size() + 5, 20011):
        x = rng.integers(-9, 10, n).astype(np.float32)
        assert np.array_equal(dt.allreduce(x, algorithm=algorithm), oracle(comm, x, "sum")), n


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["ring", "butterfly", "double_tree", "mpi", "shm"])
def test_shapes_inplace_and_noncontiguous(comm, algorithm):
    rng = rank_rng(comm, 4)
    for shape in [(), (3, 4), (2, 0, 5), (5, 3, 2)]:
        for dtype in (np.float16, np.int32, np.float64):
            x = rng.integers(-5, 6, shape).astype(dtype)
            want = oracle(comm, x, "max")
            y = x.copy()
            out = dt.allreduce_(y, op="max", algorithm=algorithm)
            assert out is y and np.array_equal(y, want)
    base = rng.integers(-5, 6, (6, 8)).astype(np.float32)
    view = base[:, ::2]  # non-contiguous, in place: the strided elements are updated, nothing else
    other = base[:, 1::2].copy()
    want = oracle(comm, np.ascontiguousarray(view), "sum")
    dt.allreduce_(view, algorithm=algorithm)
    assert np.array_equal(base[:, ::2], want) and np.array_equal(base[:, 1::2], other)
    assert np.array_equal(dt.allreduce(base.T, algorithm=algorithm), oracle(comm, base.T.copy(), "sum"))


@pytest.mark.mpi
def test_python_lists_and_scalars(comm):
    p = comm.Get_size()
    assert dt.allreduce([1.0, 2.0])[1] == 2.0 * p
    assert dt.allreduce(np.int64(3)).item() == 3 * p


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["ring", "tree", "rabenseifner", "butterfly", "mpi", "shm"])
def test_groups(comm, algorithm):
    p, r = comm.Get_size(), comm.Get_rank()
    evens = dt.new_group(range(0, p, 2))
    odds = dt.new_group(range(1, p, 2)) if p > 1 else None
    reverse = dt.new_group(list(reversed(range(p))))
    assert reverse.rank == p - 1 - r and reverse.ranks == tuple(reversed(range(p)))
    mine, other = (evens, odds) if r % 2 == 0 else (odds, evens)
    assert mine.is_member and mine.ranks[mine.rank] == r
    if other is not None:
        assert not other.is_member and other.rank == -1
    x = np.full(5, r + 1, np.int64)
    got = dt.allreduce(x, algorithm=algorithm, group=mine)
    assert np.array_equal(got, np.full(5, sum(q + 1 for q in mine.ranks)))
    assert np.array_equal(dt.allreduce(x, algorithm=algorithm, group=reverse), oracle(comm, x, "sum"))
    assert dt.allgather(np.array([r]), group=reverse).tolist() == list(reversed(range(p)))


@pytest.mark.mpi
def test_shm_many_chunks_and_rounds_blocking_and_async_at_once(comm, monkeypatch):
    """Tiny chunks: many fence rounds through both halves of the window, odd sizes, every op; an
    asynchronous shm allreduce (its own window, on the communication thread) in flight meanwhile."""
    from disttrain.comm import shm

    monkeypatch.setattr(shm, "CHUNK_BYTES", 40)  # 5 float64 / 10 float32 per chunk and rank
    rng = rank_rng(comm, 7)
    for rnd in range(30):
        n = int(rng.integers(0, 60)) if rnd else 0
        n = comm.bcast(n, root=0)
        a = rng.integers(-9, 10, 3 * n + 1).astype(np.float32)
        h = dt.allreduce_async(a, op="max", algorithm="shm")
        for dtype in (np.float64, np.int32):
            for op in ("sum", "min", "prod"):
                x = integer_data(rng, n, dtype, op)
                assert np.array_equal(dt.allreduce(x, op=op, algorithm="shm"), oracle(comm, x, op)), (rnd, dtype, op)
        assert np.array_equal(h.wait(), oracle(comm, a, "max")), rnd


@pytest.mark.mpi
def test_shm_across_nodes_is_refused_on_every_rank(comm, monkeypatch):
    """A group spanning nodes cannot use shm: every rank sees it and raises the same error (the
    predicate - node size vs group size - is a fact every rank shares; faked here on every rank)."""
    from disttrain.comm import node
    from disttrain.comm.errors import CollectiveError

    if comm.Get_size() == 1:
        pytest.skip("one rank never enters the algorithm")
    g = dt.new_group(range(comm.Get_size()))
    st = node.prepare(g.comm)  # made at the group's first (agreed) check
    monkeypatch.setattr(st, "single", False)  # as if its ranks spanned nodes, on every rank
    try:
        with pytest.raises(CollectiveError, match="one node"):
            dt.allreduce(np.ones(8), algorithm="shm", group=g)
    finally:
        monkeypatch.undo()
        g.free()
    # auto never picks it across hosts
    from disttrain.comm import costmodel

    c = costmodel.CostParams(4, hosts=2)
    assert costmodel.predict(c, "shm", 1 << 20) == float("inf")


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["auto", "mpi", "ring"])
def test_an_unaligned_array_on_one_rank_above_the_fused_limit(comm, algorithm):
    """A float64 view at an odd byte offset is a valid input: it reached mpi4py as it was on the
    library paths (KeyError "cannot map '=d'" on that rank alone - call6), and in place it was
    reduced in x itself. Out of place and in place, against MPI's own sum; rank 0 unaligned."""
    from disttrain.comm import fused

    n = fused.limit(comm.Get_size()) // 8 + 3
    if comm.Get_rank() == 0:
        x = np.zeros(8 * n + 1, np.uint8)[1:].view(np.float64)
        assert not x.flags.aligned
    else:
        x = np.empty(n)
    x[:] = rank_rng(comm, 7).integers(-9, 9, n)
    want = oracle(comm, x.copy(), "sum")  # a copy is aligned: mpi4py takes it
    np.testing.assert_array_equal(dt.allreduce(x, algorithm=algorithm), want)
    assert dt.allreduce_(x, algorithm=algorithm) is x
    np.testing.assert_array_equal(x, want)
