"""The collective setter (dt.set_validation) is an agreement point after dt.init() (call8): a rank
that calls it alone, or with another value, raises CollectiveError on every rank within the call -
never a hang (before: rank 0 waited in the fused round, rank 1 in MPI_Allreduce, for good). And
validation off keeps allreduce's shared-memory round: results stay the one-process oracle's, and
ranks that disagree on a shape raise everywhere instead of folding past a slot or hanging."""
import numpy as np
import pytest

import disttrain as dt
from disttrain.comm import config, fused, node

from .test_errors import raises_everywhere

pytestmark = pytest.mark.mpi
#: the rule's counts (odd ones included); 4 and 8 add nothing to a one-round agreement but suite time
MPI_RANKS = (1, 2, 3, 5)


def _last(comm):
    return comm.Get_rank() == comm.Get_size() - 1


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("start", [True, False])
@pytest.mark.parametrize("nbytes", [8, 64 << 10, 4 << 20])  # fused, chunked-fused, above the limit
def test_set_validation_on_one_rank_only_raises_everywhere(comm, start, nbytes):
    dt.set_validation(start)

    def alone():
        if _last(comm):
            dt.set_validation(not start)
        dt.allreduce(np.ones(nbytes // 8))
    msg = raises_everywhere(comm, alone, "different collectives")
    assert "set_validation" in msg and "allreduce" in msg, msg
    assert config.settings.validate is start  # the failed agreement installed nothing


@pytest.mark.mpi(min_size=2)
def test_set_validation_with_different_values_raises_everywhere(comm):
    msg = raises_everywhere(comm, lambda: dt.set_validation(comm.Get_rank() % 2 == 0), "set_validation")
    assert "validate" in msg and "ranks [0" in msg, msg
    assert config.settings.validate is True


@pytest.mark.mpi(min_size=2)
def test_set_validation_against_another_collective_names_both(comm):
    x = np.arange(6.0)

    def alone():
        if _last(comm):
            dt.set_validation(False)
        else:
            dt.broadcast(x)
    msg = raises_everywhere(comm, alone, "different collectives")
    assert "set_validation" in msg and "broadcast" in msg, msg


@pytest.mark.mpi(min_size=2)
def test_set_validation_on_one_rank_with_async_work_outstanding(comm):
    p = comm.Get_size()
    handles = [dt.allreduce_async(np.full(n, 1.0)) for n in (3, 70000)]

    def alone():
        if _last(comm):
            dt.set_validation(False)
        dt.allreduce(np.ones(5))
    raises_everywhere(comm, alone, "set_validation")
    for h, n in zip(handles, (3, 70000)):  # the asynchronous lane is untouched by the failed round
        assert np.array_equal(h.wait(), np.full(n, float(p)))


def test_set_validation_at_the_same_point_agrees(comm):
    p = comm.Get_size()
    h = dt.allreduce_async(np.ones(7))
    dt.set_validation(False)
    assert config.settings.validate is False
    dt.set_validation(False)  # the same value again: still an agreement, no change
    assert np.array_equal(h.wait(), np.full(7, float(p)))
    assert np.array_equal(dt.allreduce(np.ones(7)), np.full(7, float(p)))


@pytest.mark.parametrize("nbytes", [0, 8, 4 << 10, 64 << 10, 300 << 10, 2 << 20])
@pytest.mark.parametrize("inplace", [False, True])
def test_validation_off_matches_the_oracle(comm, nbytes, inplace):
    """float64 against the one-process sum of every rank's input (non-divisible sizes)."""
    p, r = comm.Get_size(), comm.Get_rank()
    n = nbytes // 8 + (1 if nbytes else 0)
    rng = np.random.default_rng(1234)
    xs = [rng.standard_normal(n) for _ in range(p)]
    want = xs[0].copy()
    for q in range(1, p):
        want += xs[q]  # the rank-order fold every path uses
    dt.set_validation(False)
    x = xs[r].copy()
    got = dt.allreduce_(x) if inplace else dt.allreduce(x)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert np.array_equal(comm.bcast(got, root=0), got)  # the same bits everywhere


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("sizes", [(2, 3), (1 << 10, 5 << 10), (100, 1 << 20), (1 << 20, 600 << 10)])
def test_validation_off_shape_disagreement_raises_everywhere(comm, sizes):
    """Sizes a rank disagrees on - inside one fused slot, past it, across the fused limit: with
    validation off the shared-memory round still compares the signature, so nothing is folded
    out of a slot's bounds and nobody waits in a protocol the others left."""
    st = node.get(dt.init().comm)
    if st is None:
        pytest.skip("no node-local shared memory on this communicator")
    dt.set_validation(False)
    n = sizes[1] if _last(comm) else sizes[0]
    raises_everywhere(comm, lambda: dt.allreduce(np.ones(n)), "shape")
    raises_everywhere(comm, lambda: dt.allreduce(np.ones(sizes[0], np.float32 if _last(comm) else np.float64)),
                      "dtype")
    assert fused.limit(st.p) < (1 << 20) * 8  # sizes[2] crosses the fused limit


def test_allreduce_async_takes_a_list_like_allreduce(comm):
    """attack9 finding 03: the out-of-place asynchronous call refused a list the blocking one takes."""
    p = comm.Get_size()
    assert np.array_equal(dt.allreduce_async([1.0, 2.0]).wait(), dt.allreduce([1.0, 2.0]))
    assert np.array_equal(dt.allreduce_async([1.0, 2.0]).wait(), np.array([p, 2.0 * p]))
