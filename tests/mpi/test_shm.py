"""Node-local shared memory (comm/node.py, comm/shm.py) and the zero-waste call path (comm/pool.py,
out-of-place library calls, small allreduces carried in the validation round): every path against
the MPI library's result, on the world and on sub-groups, many rounds, odd sizes and rank counts."""
import numpy as np
import pytest
from mpi4py import MPI

import disttrain as dt
from disttrain.comm import fused, node, shm
from disttrain.comm.ops import MAX, MIN, PROD, SUM
from disttrain.comm.pool import Pool

from .conftest import rank_rng

pytestmark = pytest.mark.mpi

DTYPES = (np.float32, np.float64, np.int32, np.int64, np.float16)
MPI_OP = {"sum": MPI.SUM, "prod": MPI.PROD, "min": MPI.MIN, "max": MPI.MAX, "avg": MPI.SUM}


def _data(comm, n, dtype, op, salt=0):
    rng = rank_rng(comm, salt)
    if op == "prod":  # small values: the product of p of them stays exact in every dtype
        return rng.integers(1, 3, n).astype(dtype)
    return (rng.integers(-50, 50, n) if np.dtype(dtype).kind == "i" else rng.standard_normal(n)).astype(dtype)


def _oracle(comm, x, op):
    """The MPI library's allreduce (float16 in float64), avg divided once at the end."""
    wide = x.astype(np.float64) if x.dtype == np.float16 else x.copy()
    out = np.empty_like(wide)
    comm.Allreduce(wide, out, op=MPI_OP[op])
    if op == "avg":
        out = out / comm.Get_size() if out.dtype.kind == "f" else out // comm.Get_size()
    return out


def _close(y, ref, dtype):
    tol = {np.float16: 2e-2, np.float32: 1e-5, np.float64: 1e-12}.get(dtype, 0)
    np.testing.assert_allclose(y.astype(np.float64), ref.astype(np.float64), rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["sum", "avg", "prod", "min", "max"])
@pytest.mark.parametrize("algorithm", ["auto", "shm"])
def test_every_dtype_op_and_size_against_the_library(comm, dtype, op, algorithm):
    # 0, 1, fewer elements than ranks, non-divisible, the fused limit and just past it, chunked
    sizes = [0, 1, comm.Get_size() - 1, 7, 1001, fused.MAX_BYTES // np.dtype(dtype).itemsize,
             fused.MAX_BYTES // np.dtype(dtype).itemsize + 1, 70_001]
    for n in sizes:
        x = _data(comm, n, dtype, op)
        ref = _oracle(comm, x, op)
        y = dt.allreduce(x, op, algorithm=algorithm)
        assert y.dtype == x.dtype and y.shape == x.shape
        _close(y, ref, dtype)
        z = x.copy()
        assert dt.allreduce_(z, op, algorithm=algorithm) is z
        np.testing.assert_array_equal(z, y)  # in place and out of place: the same bits
        assert len({y.tobytes()} | set(comm.allgather(y.tobytes()))) == 1  # the same bits on every rank


def test_chunked_shm_many_rounds_and_odd_sizes(comm, monkeypatch):
    monkeypatch.setattr(shm, "CHUNK_BYTES", 4096)  # many chunks, both halves of the window reused
    for i, n in enumerate([1, 1023, 5000, 12_345, 3 * 1024 + 1]):
        for rnd in range(6):
            x = _data(comm, n, np.float64, "sum", salt=10 * i + rnd)
            _close(dt.allreduce(x, algorithm="shm"), _oracle(comm, x, "sum"), np.float64)


def test_fused_small_rounds_back_to_back(comm):
    """Hundreds of small allreduces in a row reuse the two parity slots: a fast rank must never
    overwrite a slot a slow rank still reads."""
    for i in range(300):
        n = i % 37
        x = np.full(n, float(comm.Get_rank() + i))
        if comm.Get_rank() == i % comm.Get_size() and i % 5 == 0:
            sum(range(20_000))  # this rank arrives late
        y = dt.allreduce(x)
        assert np.all(y == sum(r + i for r in range(comm.Get_size()))), (i, y)


def test_sub_groups_and_interleaved_async(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    evens = list(range(0, p, 2))
    g = dt.new_group(evens)  # collective over the world; used by its members only
    for i in range(20):
        n = [5, 3000, 40_000][i % 3]
        x = np.arange(n, dtype=np.float64) + r
        h = dt.allreduce_async(x * 2)
        y = dt.allreduce(x)
        np.testing.assert_allclose(y, _oracle(comm, x, "sum"))
        if r in evens:
            yg = dt.allreduce(x, group=g)
            np.testing.assert_allclose(yg, np.arange(n) * len(evens) + sum(evens))
        np.testing.assert_allclose(h.wait(), 2 * y)


@pytest.mark.mpi(min_size=2)
def test_a_mismatch_in_the_shared_memory_round_raises_everywhere(comm):
    r = comm.Get_rank()
    dt.allreduce(np.ones(3))  # the world validates in shared memory from here on
    assert node.get(dt.world().comm) is not None
    for a, b in [(4, 5), (4, 5000), (3000, 9000)]:  # small vs small, small vs large, large vs large
        with pytest.raises(dt.CollectiveError, match="shape") as e:
            dt.allreduce(np.ones(a if r == 0 else b))
        assert len(set(comm.allgather(str(e.value)))) == 1
    assert np.all(dt.allreduce(np.ones(7)) == comm.Get_size())


def test_results_are_new_arrays_and_kept_results_are_never_reused(comm):
    p = comm.Get_size()
    kept = [dt.allreduce(np.full(1 << 15, float(i))) for i in range(6)]  # 256 KiB: pooled sizes
    for i, y in enumerate(kept):
        assert np.all(y == i * p)
    a = dt.allreduce(np.ones(1 << 15))
    assert not np.shares_memory(a, dt.allreduce(np.ones(1 << 15)))


@pytest.mark.parametrize("dtype", (np.float32, np.float64, np.int32, np.int64))
def test_fold_kernel_against_numpy(dtype):
    rows = (np.arange(5 * 33).reshape(5, 33) % 11 - 5).astype(dtype)
    for op in (SUM, PROD, MIN, MAX):
        out = np.empty(33, dtype)
        shm.fold(rows, out, op)
        np.testing.assert_array_equal(out, shm.fold_ref(rows, op))


def test_pool_reuses_only_dropped_buffers_and_stays_bounded():
    pool = Pool(limit=3 << 20)
    a = pool.empty((1 << 18,), np.float32)
    b = pool.empty((1 << 18,), np.float32)
    assert not np.shares_memory(a, b)
    view = a[10:]
    addr = a.__array_interface__["data"][0]
    del a
    c = pool.empty((1 << 18,), np.float32)
    assert not np.shares_memory(c, view)  # a view keeps the buffer alive
    del view, c
    d = pool.empty((1 << 17,), np.float64)
    assert d.__array_interface__["data"][0] == addr  # same bytes, another dtype and shape
    assert pool.held <= pool.limit
    big = pool.empty((1 << 20,), np.float32)  # 4 MiB > the limit: handed out, not held
    assert big.nbytes == 4 << 20 and pool.held <= pool.limit
