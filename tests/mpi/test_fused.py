"""The default call's hot path (comm/api._hot) and the compiled fused round (comm/fused.py):
against the MPI library's result, against the general path on the other ranks (a rank on either
path must interoperate with the others: same round, same bits), mismatches caught on every rank,
sub-groups of the same size, in place, async and blocking interleaved, many rounds."""
import pickle

import numpy as np
import pytest
from mpi4py import MPI

import disttrain as dt
from disttrain.comm import api, fused, node, shm
from disttrain.comm.costmodel import choose
from disttrain.comm.ops import MAX, MIN, PROD, SUM
from disttrain.comm.registry import ALLREDUCE

from .conftest import rank_rng

pytestmark = pytest.mark.mpi

DTYPES = (np.float32, np.float64, np.int32, np.int64)
MPI_OP = {"sum": MPI.SUM, "prod": MPI.PROD, "min": MPI.MIN, "max": MPI.MAX, "avg": MPI.SUM}


def _data(comm, shape, dtype, op, salt=0):
    rng = rank_rng(comm, salt)
    if op == "prod":  # 1 or 2: the product of p of them is exact in every dtype
        return rng.integers(1, 3, shape).astype(dtype)
    return (rng.integers(-50, 50, shape) if np.dtype(dtype).kind == "i" else rng.standard_normal(shape)).astype(dtype)


def _oracle(comm, x, op):
    out = np.empty_like(x)
    comm.Allreduce(np.ascontiguousarray(x), out, op=MPI_OP[op])
    if op == "avg":
        out = out / comm.Get_size() if out.dtype.kind == "f" else out // comm.Get_size()
    return out.astype(x.dtype)


def _same_everywhere(comm, y):
    assert len(set(comm.allgather(y.tobytes()))) == 1


def _sizes(comm, dtype):
    top = fused.limit(comm.Get_size()) // np.dtype(dtype).itemsize
    return [1, max(1, comm.Get_size() - 1), 7, 1001, top, top + 1]


@pytest.fixture(params=["hot everywhere", "general on odd ranks"])
def paths(request, comm, monkeypatch):
    """Either every rank takes the hot path, or the odd ranks take the general path
    (api._allreduce through validate.check with a payload): the two must meet in the same round."""
    if request.param != "hot everywhere" and comm.Get_rank() % 2:
        monkeypatch.setattr(api, "_hot", lambda *a: None)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["sum", "avg", "prod", "min", "max"])
def test_every_dtype_op_and_size_against_the_library(comm, dtype, op, paths):
    for i, n in enumerate(_sizes(comm, dtype)):
        x = _data(comm, n, dtype, op, salt=i)
        ref = _oracle(comm, x, op)
        y = dt.allreduce(x, op)
        assert y.dtype == x.dtype and y.shape == x.shape and y is not x
        tol = {np.float32: 1e-5, np.float64: 1e-12}.get(dtype, 0)
        np.testing.assert_allclose(y, ref, rtol=tol, atol=tol)
        _same_everywhere(comm, y)
        z = x.copy()
        assert dt.allreduce_(z, op) is z
        np.testing.assert_array_equal(z, y)  # in place and out of place: the same bits


def test_shapes_zero_size_and_non_contiguous(comm, paths):
    p = comm.Get_size()
    for shape in [(), (0,), (3, 0), (2, 3), (4, 5, 6)]:
        x = np.full(shape, 1.5)
        y = dt.allreduce(x)
        assert y.shape == shape and np.all(y == 1.5 * p)
    base = np.arange(40, dtype=np.float64).reshape(5, 8) + comm.Get_rank()
    view = base[:, ::3]  # not contiguous: reduced from a copy, written back in place
    ref = _oracle(comm, view, "sum")
    np.testing.assert_array_equal(dt.allreduce(view), ref)
    assert dt.allreduce_(view) is view
    np.testing.assert_array_equal(base[:, ::3], ref)


@pytest.mark.mpi(min_size=2)
def test_mismatches_raise_the_same_error_everywhere(comm, paths):
    r = comm.Get_rank()
    dt.allreduce(np.ones(3))  # the world validates in shared memory from here on
    assert node.get(dt.world().comm) is not None
    cases = [
        (lambda: dt.allreduce(np.ones(4 if r == 0 else 5)), "shape"),
        (lambda: dt.allreduce(np.ones(4, np.float32 if r == 0 else np.float64)), "dtype"),
        (lambda: dt.allreduce(np.ones(4, np.int64), "sum" if r == 0 else "max"), "op"),
        (lambda: dt.allreduce(np.ones(4), algorithm="auto" if r == 0 else "mpi"), "algorithm"),
        (lambda: dt.allreduce(np.ones(8 if r == 0 else fused.limit(comm.Get_size()))), "shape"),  # fused vs not
        (lambda: dt.allreduce(np.ones((2, 3) if r == 0 else (3, 2))), "shape"),  # same bytes, new shapes
        (lambda: dt.allreduce(np.ones((6,) if r == 0 else (1, 6))), "shape"),
        (lambda: dt.allreduce(np.ones(() if r == 0 else (1,))), "shape"),
        (lambda: dt.allreduce(np.ones(4) if r == 0 else np.ones(4, np.complex128)), "dtype"),
    ]
    for call, what in cases:
        with pytest.raises(dt.CollectiveError, match=what) as e:
            call()
        assert len(set(comm.allgather(str(e.value)))) == 1
        if what == "shape":  # the hot path's call site (stall.call_site(3)) is the caller's line
            assert f"{__file__}:" in str(e.value), str(e.value)
        assert np.all(dt.allreduce(np.ones(7)) == comm.Get_size())  # the group is still usable


def test_sub_groups_of_the_same_size_and_async_interleaved(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    half = max(1, p // 2)
    lo, hi = list(range(half)), list(range(half, min(p, 2 * half)))  # two groups of the same size
    groups = [dt.new_group(lo)] + ([dt.new_group(hi)] if hi else [])
    mine = groups[0] if r in lo else groups[-1] if r in hi else None
    ranks = lo if r in lo else hi
    for i in range(60):
        n = [1, 5, 300, 4097][i % 4]
        x = np.arange(n, dtype=np.float64) + r + i
        h = dt.allreduce_async(x * 2)
        y = dt.allreduce(x)
        np.testing.assert_array_equal(y, _oracle(comm, x, "sum"))
        if mine is not None:
            yg = dt.allreduce(x, group=mine)
            np.testing.assert_array_equal(yg, np.arange(n) * len(ranks) + sum(ranks) + len(ranks) * i)
        np.testing.assert_array_equal(h.wait(), 2 * y)
    for g in groups:
        g.free()


def test_many_rounds_with_late_ranks(comm):
    """Both parity slots reused hundreds of times while one rank at a time arrives late: a fast
    rank must never overwrite a slot a slow rank still folds."""
    p, r = comm.Get_size(), comm.Get_rank()
    for i in range(400):
        n = 1 + (i * 7919) % 5000
        x = np.full(n, float(r + i))
        if r == i % p and i % 3 == 0:
            sum(range(5_000))  # this rank arrives late
        y = dt.allreduce(x) if i % 2 else dt.allreduce_(x)
        assert np.all(y == sum(q + i for q in range(p))), i


def test_new_shapes_each_call_and_the_same_hash_everywhere(comm):
    """The shape enters the hash per call (fused.shape_hash), not through a plan per shape: every
    call at a new shape - same bytes or not, first use or not - still agrees or raises, and the
    hash is the same in every process (Python's own tuple hash is not promised to be)."""
    p, r = comm.Get_size(), comm.Get_rank()
    shapes = [(), (0,), (1,), (6,), (2, 3), (3, 2), (1, 6), (6, 1), (2, 1, 3), (1 << 40,), (-1,)]
    hs = [fused.shape_hash(s) for s in shapes]
    assert len(set(hs)) == len(shapes) and all(0 <= h < 1 << 63 for h in hs)
    assert len(set(map(tuple, comm.allgather(hs)))) == 1
    assert fused.shape_hash((np.int64(2), 3)) == fused.shape_hash((2, 3))
    for i in range(40):  # a fresh shape on every call, sizes crossing the fused limit
        shape = (1 + i % 5, 3 + 7 * i) if i % 3 else (fused.limit(p) // 8 - 20 + i,)
        x = np.full(shape, float(r + i))
        y = dt.allreduce(x) if i % 2 else dt.allreduce_(x.copy())
        assert y.shape == shape and np.all(y == sum(q + i for q in range(p))), i


@pytest.fixture
def small_chunks(comm, monkeypatch):
    """Rounds of 4 KiB (fused.CHUNK_BYTES) so that small payloads stream through the slots in many
    rounds; the cached plans are dropped (a plan keeps its chunk) on every rank alike."""
    monkeypatch.setattr(fused, "CHUNK_BYTES", 4096)
    for c in (dt.world().comm, dt.world().async_comm):
        if node.get(c) is not None:
            node.get(c).plans.clear()
    yield 4096
    for c in (dt.world().comm, dt.world().async_comm):
        if node.get(c) is not None:
            node.get(c).plans.clear()


@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_chunked_rounds_around_every_chunk_boundary(comm, dtype, paths, small_chunks):
    """A payload larger than a chunk takes one round per chunk (fused._exchange): sizes around
    chunk multiples, every op, against the library, in place and out, the same bits everywhere,
    whichever path each rank takes."""
    c = small_chunks // np.dtype(dtype).itemsize
    for op in ("sum", "avg", "prod", "max"):
        for i, n in enumerate([c - 1, c, c + 1, 3 * c, 3 * c + 1, 7 * c + 5]):
            x = _data(comm, n, dtype, op, salt=i)
            y = dt.allreduce(x, op)
            tol = 1e-5 if dtype == np.float32 else 0
            np.testing.assert_allclose(y, _oracle(comm, x, op), rtol=tol, atol=tol)
            _same_everywhere(comm, y)
            z = x.copy()
            assert dt.allreduce_(z, op) is z
            np.testing.assert_array_equal(z, y)


@pytest.mark.mpi(min_size=2)
def test_chunked_mismatch_and_late_ranks(comm, paths, small_chunks):
    """Different shapes of different round counts raise the same error on every rank after one
    round (the peers count the same rounds afterwards); then many chunked rounds with a late
    rank each time, blocking and async interleaved."""
    p, r = comm.Get_size(), comm.Get_rank()
    with pytest.raises(dt.CollectiveError, match="shape") as e:
        dt.allreduce(np.ones(5000 if r == 0 else 3000))
    assert len(set(comm.allgather(str(e.value)))) == 1
    for i in range(24):
        n = 1 + (i * 7919) % 6000
        x = np.full(n, float(r + i))
        if r == i % p:
            sum(range(20_000))  # this rank arrives late
        h = dt.allreduce_async(x)
        y = dt.allreduce(x) if i % 2 else dt.allreduce_(x.copy())
        assert np.all(y == sum(q + i for q in range(p))), i
        assert np.all(h.wait() == y)


@pytest.mark.mpi(min_size=2)
def test_larger_default_calls_validate_in_one_compiled_round(comm, monkeypatch):
    """Above the fused limit a default out-of-place call stays on the hot path (the validation
    round alone, fused.run with no payload, then the library into a recycled result): the general
    path is not entered (when the algorithm `auto` picks has an out-of-place form: else it must
    be), and the result is the library's (sum and avg)."""
    n = fused.limit(comm.Get_size()) // 8 + 3
    hot = choose("allreduce", dt.world().comm, n * 8, np.dtype(np.float64)) in ALLREDUCE.into
    if hot:
        monkeypatch.setattr(api, "_tracked_allreduce", lambda *a, **k: pytest.fail("took the general path"))
    for op in ("sum", "avg"):
        x = _data(comm, n, np.float64, op)
        y = dt.allreduce(x, op)
        np.testing.assert_allclose(y, _oracle(comm, x, op), rtol=1e-12, atol=1e-12)  # another summation order
        _same_everywhere(comm, y)


def test_settings_changes_take_effect(comm):
    p = comm.Get_size()
    assert np.all(dt.allreduce(np.ones(5)) == p)
    dt.set_validation(False)
    assert np.all(dt.allreduce(np.ones(5)) == p)
    dt.set_validation(True)
    assert np.all(dt.allreduce(np.ones(5), "avg") == 1)


# ------------------------------------------------------------------ the kernels, in one process
@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_round_against_numpy(dtype):
    """_exchange / _complete with p = 3 simulated in one process: the fold equals the NumPy
    reference (rank order), a differing header folds nothing, a missing counter waits."""
    p, n, h = 3, 37, 12345
    ctrl = np.zeros(p * 24, np.int64)
    slots = np.zeros((p, 2, 64), dtype)
    rows = (np.arange(p * n).reshape(p, n) % 11 - 5).astype(dtype)
    for op in (SUM, PROD, MIN, MAX):
        k = int(ctrl[8]) + 1
        for q in (1, 2):  # the peers posted round k
            slots[q, k & 1, :n] = rows[q]
            ctrl[p * 8 + (q * 2 + (k & 1)) * 8:][:2] = (1, h)
            ctrl[q * 8] = k
        out = np.empty(n, dtype)
        assert fused._exchange(ctrl, slots, rows[0].copy(), out, 0, p, k, h, op, 10, False, 64, 0) == fused.DONE
        np.testing.assert_array_equal(out, shm.fold_ref(rows, op))
        assert ctrl[0] == k
    k = int(ctrl[0]) + 1
    ctrl[8] = k  # rank 2 is late
    assert fused._exchange(ctrl, slots, rows[0].copy(), np.empty(n, dtype), 0, p, k, h, SUM, 10, False, 64,
                           0) == fused.LATE
    ctrl[16] = k
    ctrl[p * 8 + (1 * 2 + (k & 1)) * 8 + 1] = h + 1  # rank 1 posted another signature
    out = np.full(n, 7, dtype)
    assert fused._complete(ctrl, slots, out, p, k, h, SUM) == -1
    assert np.all(out == 7)


def test_compiled_rounds_resume_chunk_by_chunk():
    """A multi-chunk _exchange with p = 2 simulated in one process: it stops at the first round
    whose peer has not arrived (returning LATE + that chunk), resumes there with posted=True,
    and folds every chunk (rank order) into its place; rank 0's slot of each round holds its own
    chunk. A header that differs at a later chunk returns MISMATCH - that chunk."""
    p, n, ch, h = 2, 23, 5, 777
    ctrl = np.zeros(p * 24, np.int64)
    slots = np.zeros((p, 2, 8), np.float64)
    x0, x1 = np.arange(n, dtype=np.float64), np.arange(n, dtype=np.float64) * 10 + 1
    out, k = np.full(n, -1.0), 5
    done, posted = fused._exchange(ctrl, slots, x0, out, 0, p, k, h, SUM, 3, False, ch, 0), False
    rounds = 0
    while done != fused.DONE:
        c = done - fused.LATE
        assert c >= 0 and ctrl[0] == k + c and np.all(out[c * ch:] == -1)  # arrived, nothing of this chunk folded
        par = (k + c) & 1
        np.testing.assert_array_equal(slots[0, par, :min(ch, n - c * ch)], x0[c * ch:][:ch])
        slots[1, par, :min(ch, n - c * ch)] = x1[c * ch:][:ch]  # the peer posts round k + c
        ctrl[p * 8 + (2 + par) * 8:][:2] = (1, h)
        ctrl[8] = k + c
        done = fused._exchange(ctrl, slots, x0, out, 0, p, k, h, SUM, 3, True, ch, c)
        rounds += 1
    assert rounds == fused.rounds(n, ch) == 5
    np.testing.assert_array_equal(out, x0 + x1)
    k += 5  # the same call again, the peer's header of its fourth round (chunk 3) differs
    ctrl[8] = k + 2
    for c in range(3):
        par = (k + c) & 1
        ctrl[p * 8 + (2 + par) * 8:][:2] = (1, h)
    done = fused._exchange(ctrl, slots, x0, out, 0, p, k, h, SUM, 3, False, ch, 0)
    assert done == fused.LATE + 3
    ctrl[8] = k + 3
    ctrl[p * 8 + (2 + ((k + 3) & 1)) * 8 + 1] = h + 1
    assert fused._exchange(ctrl, slots, x0, out, 0, p, k, h, SUM, 3, True, ch, 3) == fused.MISMATCH - 3


@pytest.mark.mpi
def test_an_unpickled_dtype_fuses_like_the_canonical_one(comm):
    """An array whose dtype came through pickle (mpi4py's lowercase bcast, a pickled data set)
    has a dtype equal to np.float32 but not the same object. Decided by identity, that rank left
    the fused round its peers took: they folded its stale slot and returned wrong sums while it
    waited alone in the algorithm (a hang). The plan cache is primed first, as any earlier call
    on another communicator does."""
    dt.allreduce_async(np.ones(4, np.float32)).wait()
    for inplace in (False, True):
        x = np.full(4, comm.Get_rank() + 1.0, np.float32)
        if comm.Get_rank() % 2:
            x = pickle.loads(pickle.dumps(x))
        got = dt.allreduce_(x) if inplace else dt.allreduce(x)
        p = comm.Get_size()
        np.testing.assert_array_equal(got, np.full(4, p * (p + 1) / 2, np.float32))
