"""Failure notices, bookkeeping only (one process, no MPI traffic): a rank that failed two calls
meant for different groups - the late peer's wait on the first group ends because that group is
broken (another member's notice said so), and must not eat the notice of the failed rank's SECOND
call, which the other group's member still needs (found by the fuzzer, seed 7008 at 4 ranks)."""
import collections
import time

import pytest

from disttrain import flight, stall


@pytest.fixture
def notices():
    saved = dict(stall._peer_failed), dict(stall._broken), list(stall._used_up)
    stall._peer_failed.clear(), stall._broken.clear(), stall._used_up.clear()
    yield
    stall._peer_failed.clear(), stall._broken.clear(), stall._used_up.clear()
    stall._peer_failed.update(saved[0]), stall._broken.update(saved[1]), stall._used_up.extend(saved[2])


def notice(site, gseq, number):
    """Rank 2's `number`-th failure notice: an allreduce of 4 int64 with group= not a Group, at `site`."""
    return ("rank 2: allreduce: group must be ...", gseq, time.monotonic(), None,
            ("allreduce", (4,), "int64", site), {"A", "B"}, number)


def test_a_wait_on_a_broken_group_keeps_the_notice_of_the_next_failed_call(notices):
    first, second = notice("prog.py:193", {"A:b": 5}, 1), notice("prog.py:196", {"A:b": 5, "B:a": 1}, 2)
    stall._peer_failed[2] = [second]  # `first` was already dropped by the "broken" notice of A
    stall._broken["A"] = "the group A is unusable after an abandoned collective"
    # this rank's wait on A (its 6th call there) gives up: the group is broken
    why = stall.peers_problem((3, 2, 1, 0), "A:b", 6, sig=first[4])
    assert "unusable" in why
    stall.consume_unknown((3, 2, 1, 0))
    assert stall._peer_failed.get(2) == [second]
    # ... so that its next wait, rank 2's second failed call on B, raises with rank 2's message
    assert stall.peers_problem((1, 2), "B:a", 2, sig=second[4]) == second[0]
    assert not stall._peer_failed.get(2)  # used up


def test_two_notices_of_one_rank_are_both_kept_and_used_in_their_own_waits(notices):
    first, second = notice("prog.py:193", {"A:b": 5}, 1), notice("prog.py:196", {"A:b": 5, "B:a": 1}, 2)
    stall._peer_failed[2] = [first, second]
    assert stall.peers_problem((1, 2), "B:a", 2, sig=second[4]) == second[0]
    assert stall.peers_problem((3, 2, 1, 0), "A:b", 6, sig=first[4]) == first[0]
    assert stall.peers_problem((3, 2, 1, 0), "A:b", 6, sig=first[4]) is None


def test_unrecorded_takes_its_entries_back_out_of_a_full_flight_record(monkeypatch):
    """dt.init's warm-up call must not show in the flight record even when the record is already
    full (DISTTRAIN_FLIGHT_RECORDS small): a full deque does not grow on append, so the entries
    are taken back by identity, not by length."""
    buf = collections.deque(["a", "b"], maxlen=2)
    monkeypatch.setattr(flight, "_buf", buf)
    with stall.unrecorded():
        buf.append("warm-up")
    assert "warm-up" not in buf and list(buf) == ["b"]
