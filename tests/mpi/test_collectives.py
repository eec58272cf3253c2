"""reduce_scatter, allgather, broadcast and alltoall(v) against MPI's own collectives."""
import numpy as np
import pytest

import disttrain as dt

from .conftest import rank_rng

DTYPES = [np.float16, np.float32, np.float64, np.int32, np.int64]


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["ring", "mpi", "auto"])
def test_reduce_scatter(comm, algorithm):
    p, r = comm.Get_size(), comm.Get_rank()
    rng = rank_rng(comm, 10)
    for dtype in DTYPES:
        for shape in [(0,), (1,), (p - 1 or 1, 3), (p + 1,), (7, 2, 3), (1001,)]:
            for op in ("sum", "avg", "max"):
                x = rng.integers(-20, 21, shape).astype(dtype)
                total = np.sum(comm.allgather(x.astype(np.float64)), axis=0)
                if op == "max":
                    total = np.max(comm.allgather(x.astype(np.float64)), axis=0)
                if op == "avg":
                    total = total / p if np.dtype(dtype).kind == "f" else total // p
                want = np.array_split(total.astype(dtype), p, axis=0)[r]
                got = dt.reduce_scatter(x, op=op, algorithm=algorithm)
                assert got.dtype == x.dtype and got.shape == want.shape
                assert np.array_equal(got, want), (np.dtype(dtype).name, shape, op)


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["ring", "mpi", "auto"])
def test_allgather_with_different_first_dims(comm, algorithm):
    r = comm.Get_rank()
    rng = rank_rng(comm, 11)
    for dtype in DTYPES + [np.bool_, np.uint8, np.complex64]:
        for tail in [(), (3,), (2, 2)]:
            for rows in (0, 1, 3 + r, 2 * r):
                x = rng.integers(0, 100, (rows,) + tail).astype(dtype)
                got = dt.allgather(x, algorithm=algorithm)
                want = np.concatenate(comm.allgather(x))
                assert got.dtype == x.dtype and np.array_equal(got, want), (np.dtype(dtype).name, tail, rows)


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["tree", "mpi", "auto"])
def test_broadcast_from_every_root(comm, algorithm):
    p = comm.Get_size()
    rng = rank_rng(comm, 12)
    for root in range(p):
        for dtype in DTYPES + [np.bool_, np.complex128]:
            for shape in [(), (0,), (5,), (300, 7)]:
                mine = rng.integers(0, 100, shape).astype(dtype)
                want = comm.bcast(mine, root=root)
                got = dt.broadcast(mine, root=root, algorithm=algorithm)
                assert np.array_equal(got, want)
                y = mine.copy()
                assert dt.broadcast_(y, root=root, algorithm=algorithm) is y and np.array_equal(y, want)


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", list(dt.ALLTOALL_ALGORITHMS) + ["auto"])
def test_alltoallv_uneven_splits(comm, algorithm):
    p, r = comm.Get_size(), comm.Get_rank()
    rng = rank_rng(comm, 13)
    for dtype in (np.float32, np.int64, np.float16, np.uint8):
        for tail in [(), (3,)]:
            for pattern in range(4):
                if pattern == 0:
                    splits = [0] * p  # nothing to send at all
                elif pattern == 1:
                    splits = [(r + j) % 3 for j in range(p)]  # zeros mixed in
                elif pattern == 2:
                    splits = [int(v) for v in rng.integers(0, 6, p)]
                else:
                    splits = [40 * (j == (r + 1) % p) for j in range(p)]  # everything to one rank
                x = rng.integers(0, 1000, (sum(splits),) + tail).astype(dtype)
                blocks = np.split(x, np.cumsum(splits)[:-1]) if p > 1 else [x]
                want = comm.alltoall(blocks)
                y, recv_splits = dt.alltoall(x, splits, algorithm=algorithm)
                assert recv_splits == [len(b) for b in want]
                assert y.dtype == x.dtype and np.array_equal(y, np.concatenate(want)), (pattern, tail)


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", list(dt.ALLTOALL_ALGORITHMS))
def test_alltoall_default_split_is_array_split(comm, algorithm):
    p = comm.Get_size()
    for rows in (0, 1, p, 2 * p + 1):
        x = np.arange(rows * 2, dtype=np.int32).reshape(rows, 2) + 1000 * comm.Get_rank()
        y, rs = dt.alltoall(x, algorithm=algorithm)
        want = comm.alltoall(np.array_split(x, p, axis=0))
        assert rs == [len(b) for b in want] and np.array_equal(y, np.concatenate(want))
        empty_rows = np.zeros((rows + comm.Get_rank(), 0), np.float64)  # rows of zero bytes still count
        y0, rs0 = dt.alltoall(empty_rows, algorithm=algorithm)
        want0 = comm.alltoall(np.array_split(empty_rows, p, axis=0))
        assert rs0 == [len(b) for b in want0] and y0.shape == (sum(rs0), 0)


@pytest.mark.mpi
def test_topology(comm):
    assert dt.rank() == comm.Get_rank() and dt.size() == comm.Get_size()
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    assert (dt.local_rank(), dt.local_size()) == (local.Get_rank(), local.Get_size())
    assert dt.init() is dt.init()  # idempotent
