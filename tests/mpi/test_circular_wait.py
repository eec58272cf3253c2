"""A circular wait across lanes or groups ends with CollectiveError on every rank (stall.py,
waitfor.py) - and a slow but correct program is never accused.

Rank 1 in an asynchronous collective while the others are in a blocking one on the same group
(two communicators: the signature check never compares them), or two groups used in swapped
order: before, every rank waited for good with a stall report. The groups are new ones (not the
world): an ended call leaves its group unusable, and the world must stay usable for the next
test; each test ends with a world allreduce checked against the process count.
"""
import time

import numpy as np
import pytest

import disttrain as dt
from disttrain import stall

pytestmark = pytest.mark.mpi
# 1 (skips), 2 (the smallest cycle), 3 and 5 (odd: the others of the group wait with rank 0); each
# case waits ~2 s for the verdict: 4 and 8 would add time and reach no other case
MPI_RANKS = (1, 2, 3, 5)

WARN = 0.5  # the stall interval in these tests: a cycle is looked for after WARN, confirmed max(WARN, 1) s later


@pytest.fixture
def quick_stall():
    warn, shutdown = stall._settings["warn"], stall._settings["shutdown"]
    dt.set_stall_timeout(WARN, 0)
    yield
    dt.set_stall_timeout(warn, shutdown)


def _world_still_works(comm):
    comm.Barrier()
    assert np.all(dt.allreduce(np.ones(3)) == comm.Get_size())


@pytest.mark.mpi(min_size=2)
def test_async_lane_against_blocking_lane_raises_on_every_rank(comm, quick_stall):
    r, p = comm.Get_rank(), comm.Get_size()
    g = dt.new_group(range(p))
    x = np.ones(10) * (r + 1)
    t = time.monotonic()
    with pytest.raises(dt.CollectiveError, match="circular wait") as e:
        if r == 1:
            dt.allreduce_async(x, group=g).wait()
        else:
            dt.allreduce(x, group=g)
    assert time.monotonic() - t < 30
    msg = str(e.value)
    assert "allreduce (async) #1 of group" in msg and "allreduce #1 of group" in msg, msg  # both calls named
    with pytest.raises(dt.CollectiveError, match="unusable"):  # the group is given up on every rank
        dt.allreduce(x, group=g)
    _world_still_works(comm)


@pytest.mark.mpi(min_size=2)
def test_two_groups_used_in_swapped_order_raise_on_every_rank(comm, quick_stall):
    r, p = comm.Get_rank(), comm.Get_size()
    a, b = dt.new_group(range(p)), dt.new_group(range(p))
    first = a if r == 0 else b  # rank 0: a then b; the others: b then a
    with pytest.raises(dt.CollectiveError, match="circular wait") as e:
        dt.allreduce(np.ones(4), group=first)
    assert f"group {a.uid}:b" in str(e.value) and f"group {b.uid}:b" in str(e.value), str(e.value)
    _world_still_works(comm)


@pytest.mark.mpi(min_size=2)
def test_a_slow_rank_is_not_accused(comm, quick_stall):
    """Rank 1 sleeps 3 stall intervals before its blocking call, its asynchronous call (which
    waits for the others' asynchronous call, issued only after their blocking one) in flight
    meanwhile: the others wait for rank 1, rank 1's communication thread waits for them - but
    rank 1's main thread is computing, not blocked, so this is no cycle. Oracle: the sums."""
    r, p = comm.Get_rank(), comm.Get_size()
    g = dt.new_group(range(p))
    x = np.arange(5.0) * (r + 1)
    want = np.arange(5.0) * p * (p + 1) / 2
    if r == 1:
        h = dt.allreduce_async(x, group=g)
        time.sleep(3 * WARN)
        y = dt.allreduce(x, group=g)
        z = h.wait()
    else:
        y = dt.allreduce(x, group=g)
        z = dt.allreduce_async(x, group=g).wait()
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(z, want, rtol=0, atol=1e-12)
    time.sleep(3 * WARN)  # a cycle verdict reached late would still break the group: look again
    np.testing.assert_allclose(dt.allreduce(x, group=g), want, rtol=0, atol=1e-12)
    _world_still_works(comm)
