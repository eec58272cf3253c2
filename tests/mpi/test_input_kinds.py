"""Mixed input kinds per rank (issue 16's call path): one rank passes a read-only, unaligned,
strided, Fortran-order, ndarray-subclass or memoryview input, the others a plain C-contiguous array of the same
shape and values. Which path a rank takes (the hot path, a compiled entry point, numba's
dispatcher, the general path) may depend on its own input's memory layout - the wire protocol
(rounds, payloads, hashes) must not. Sizes below, at and above the fused limit (fused.limit),
with several chunks where the limit allows; warm ("hot everywhere": the signature's plan exists
on every rank) and first calls (plans and caches dropped on every rank); against MPI's own
allreduce of plain copies."""
import numpy as np
import pytest

import disttrain as dt
from disttrain.comm import api, fused, node

from .conftest import rank_rng

pytestmark = pytest.mark.mpi

KINDS = ("readonly", "unaligned", "strided", "fortran", "subclass", "memoryview")
INPLACE_KINDS = ("unaligned", "strided", "fortran", "subclass")  # the in-place variant needs a writeable ndarray


class _Sub(np.ndarray):
    pass


def _kind(x: np.ndarray, kind: str):
    """An input equal to `x` (same shape and values) in the given memory layout."""
    if kind == "plain":
        return x.copy()
    if kind == "readonly":
        y = x.copy()
        y.flags.writeable = False
        return y
    if kind == "unaligned":  # a view at an odd byte offset
        y = np.zeros(x.nbytes + 1, np.uint8)[1:].view(x.dtype).reshape(x.shape)
        assert not y.flags.aligned or x.itemsize == 1
        y[...] = x
        return y
    if kind == "strided":  # every other element of a larger array
        y = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)[..., ::2]
        y[...] = x
        return y
    if kind == "fortran":
        return np.array(x, order="F", copy=True)  # asfortranarray returns a 1-d x itself
    if kind == "subclass":  # not exactly an ndarray: the general path
        return x.copy().view(_Sub)
    if kind == "memoryview":  # not an array at all (converted by the call; the dtype survives)
        return memoryview(x.copy())
    raise ValueError(kind)


def _sizes(p: int, itemsize: int):
    """Elements: tiny, one chunk and a bit (several rounds where the limit allows), the limit,
    just above it (the validation round, then the library) - all within or around the slots."""
    top = fused.limit(p) // itemsize
    ch = fused.chunk(p, itemsize)
    return sorted({1, min(top, ch + 3), top, top + 3})


def _shape(n: int, two_d: bool):
    """(n,), or about n elements in 3 columns (a Fortran-order copy is then another layout)."""
    return (max(1, n // 3), 3) if two_d else (n,)


def _forget_plans():
    """Every rank alike: the next call at any signature is a first call (no plan, no hash)."""
    for c in (dt.world().comm, dt.world().async_comm):
        st = node.get(c)
        if st is not None:
            st.plans.clear()
    api._plans.clear()
    fused._shapes.clear()


@pytest.fixture(params=["hot everywhere", "first call"])
def warmth(request, comm):
    return request.param


@pytest.mark.parametrize("dtype", [np.float64, np.int32])
def test_one_rank_passes_another_input_kind(comm, dtype, warmth):
    p, r = comm.Get_size(), comm.Get_rank()
    itemsize = np.dtype(dtype).itemsize
    for i, n in enumerate(_sizes(p, itemsize)):
        for two_d in (False, True) if n < fused.limit(p) // itemsize else (False,):  # lean: 1-d at the limit
            shape = _shape(n, two_d)
            base = rank_rng(comm, i).integers(-40, 40, shape).astype(dtype)
            want = np.empty_like(base)
            comm.Allreduce(base, want)
            # lean at the limit: the layouts that decide the hot path's own choices (carray:
            # the entry point; aligned and contiguous: delegated or general); a 1-d Fortran copy
            # is a plain one, and non-ndarrays take the general path at any size
            for kind in KINDS if len(shape) == 2 or n < fused.limit(p) // itemsize else KINDS[:3]:
                odd = (i + len(kind)) % p  # the rank with the other kind moves around
                for inplace in (False, True):
                    if inplace and kind not in INPLACE_KINDS:
                        continue
                    if warmth == "hot everywhere":  # the signature's plan (any shape) exists everywhere
                        tiny = np.ones(1, dtype)
                        dt.allreduce_(tiny) if inplace else dt.allreduce(tiny)
                    else:
                        _forget_plans()
                    x = _kind(base, kind if r == odd else "plain")
                    what = f"{kind} on rank {odd}, shape {shape}, {'in place' if inplace else 'out of place'}"
                    y = dt.allreduce_(x) if inplace else dt.allreduce(x)
                    if inplace:
                        assert y is x, what
                    y = np.asarray(y)
                    assert y.shape == shape and y.dtype == base.dtype, what
                    np.testing.assert_array_equal(y, want, err_msg=what)
                    assert len(set(comm.allgather(y.tobytes()))) == 1, what


def test_every_kind_of_input_on_every_rank_in_one_program(comm):
    """Many calls in a row, each rank drawing its own kind per call (the same draws on every
    rank: a seeded generator): the rounds stay in step across paths over a long sequence."""
    p, r = comm.Get_size(), comm.Get_rank()
    rng = np.random.default_rng(42)  # the same sequence on every rank
    kinds = ("plain",) + KINDS
    top = fused.limit(p) // 8
    for i in range(60):
        n = int(rng.choice([1, 5, 999, top, top + 1]))
        per_rank = rng.integers(0, len(kinds), p)
        inplace = bool(rng.integers(0, 2))
        kind = kinds[per_rank[r]]
        if inplace and kind not in INPLACE_KINDS + ("plain",):
            kind = "plain"
        base = np.full(n, float(r + i))
        x = _kind(base, kind)
        y = np.asarray(dt.allreduce_(x) if inplace else dt.allreduce(x))
        assert np.all(y == sum(q + i for q in range(p))), (i, kind, n, inplace)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("warm", [True, False])
def test_a_read_only_array_in_place_on_one_rank_is_an_error_everywhere(comm, warm):
    """The in-place variant needs a writeable array: one rank's read-only x is its local error
    (the general path), while its peers are on the hot path with a payload of one or several
    chunks - every rank raises the same CollectiveError, and the group stays usable."""
    p, r = comm.Get_size(), comm.Get_rank()
    for n in (1, fused.chunk(p, 8) + 5, fused.limit(p) // 8 + 1):
        if warm:
            dt.allreduce_(np.ones(1))
        else:
            _forget_plans()
        x = np.full(n, float(r))
        if r == p - 1:
            x.flags.writeable = False
        with pytest.raises(dt.CollectiveError, match="writeable") as e:
            dt.allreduce_(x)
        assert len(set(comm.allgather(str(e.value)))) == 1
        assert np.all(x == r)  # nothing written on any rank
        assert np.all(dt.allreduce(np.ones(n)) == p)
