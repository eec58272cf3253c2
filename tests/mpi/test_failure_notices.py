"""Failure notices (stall.py) under attack: a rank that fails several calls in a row.

A rank whose ``group=`` is not a Group cannot agree on the error with its group, so it announces
the failure to every rank; its peers, waiting in the call it never joined, raise with its message.
These tests make the failing rank fail again before its (late) peers have looked at the first
notice: each notice must still reach the wait it belongs to - a second notice must not replace the
first (that left the peers waiting in the first call, and paired them with the failed rank's next
call on the group).
"""
import time

import numpy as np
import pytest

import disttrain as dt

pytestmark = pytest.mark.mpi

LATE = 0.5  # the peers come this late: both of rank 1's notices have arrived when they wait


@pytest.mark.mpi(min_size=2)
def test_two_bad_calls_in_a_row_on_one_group_both_raise_on_the_late_peers(comm):
    p = comm.Get_size()
    g = dt.new_group(range(p))
    bad = comm.Get_rank() == 1
    grp = "not a group" if bad else g
    if not bad:
        time.sleep(LATE)
    errors = []
    for line in range(2):  # two call sites: each failure notice names its own line
        try:
            if line == 0:
                dt.allreduce(np.ones(4), group=grp)
            else:
                dt.allreduce(np.ones(4), group=grp)
        except dt.CollectiveError as e:
            errors.append(str(e))
    assert len(errors) == 2, errors
    if not bad:  # the first call raised with rank 1's own failure, the second on the broken group
        assert "rank 1" in errors[0] and "group must be" in errors[0], errors
        assert "unusable" in errors[1], errors
    comm.Barrier()
    assert np.all(dt.allreduce(np.ones(3)) == p)


@pytest.mark.mpi(min_size=3)
def test_bad_calls_meant_for_two_groups_reach_both_groups(comm):
    """Rank 1 fails a call meant for [0, 1], then one meant for [1, 2]: rank 0 and rank 2 each
    raise in their own call (rank 0's notice was overwritten by the second: rank 0 hung)."""
    r = comm.Get_rank()
    g01, g12 = dt.new_group([0, 1]), dt.new_group([1, 2])
    if r != 1:
        time.sleep(LATE)
    errors = []
    if r in (0, 1):
        try:
            dt.allreduce(np.ones(4), group="not a group" if r == 1 else g01)
        except dt.CollectiveError as e:
            errors.append(str(e))
    if r in (1, 2):
        try:
            dt.allreduce(np.ones(4), group="not a group" if r == 1 else g12)
        except dt.CollectiveError as e:
            errors.append(str(e))
    want = {0: 1, 1: 2, 2: 1}.get(r, 0)
    assert len(errors) == want, errors
    assert all("rank 1" in e and "group must be" in e for e in errors), errors
    comm.Barrier()
    assert np.all(dt.allreduce(np.ones(3)) == comm.Get_size())
