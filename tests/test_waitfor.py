"""The wait-for graph (waitfor.py) on hand-made answers: who is in a circular wait, who is not."""
from disttrain import waitfor


def st(blocked, issued, *ops):
    return {"blocked": blocked, "issued": issued, "ops": [(g, s, r, f"call #{s} of {g}") for g, s, r in ops]}


def lane(blocked1=True, issued0_a=0):
    """Rank 0 in the blocking lane's first call, rank 1 in the asynchronous lane's first call."""
    return {0: st(True, {"w:b": 1, "w:a": issued0_a}, ("w:b", 1, (0, 1))),
            1: st(blocked1, {"w:a": 1}, ("w:a", 1, (0, 1)))}


def test_blocking_against_asynchronous_lane_is_a_cycle_on_both_sides():
    s = lane()
    assert waitfor.cycle_through(0, s) == [0, 1] and waitfor.cycle_through(1, s) == [1, 0]
    msg = waitfor.describe(0, [0, 1], s)
    assert "call #1 of w:b" in msg and "call #1 of w:a" in msg


def test_a_rank_that_computes_is_not_in_a_cycle():
    # rank 1's asynchronous call waits for rank 0, but its main thread is not blocked: it will come
    assert waitfor.cycle_through(0, lane(blocked1=False)) is None
    assert waitfor.cycle_through(1, lane(blocked1=False)) is None


def test_a_call_every_member_has_issued_waits_for_nobody():
    # rank 0 issued its asynchronous call too (queued behind, or running): rank 1's call progresses
    assert waitfor.cycle_through(0, lane(issued0_a=1)) is None


def test_a_rank_that_did_not_answer_is_never_accused():
    s = lane()
    del s[1]
    assert waitfor.cycle_through(0, s) is None


def test_three_groups_in_a_ring_and_the_bystander():
    # 0 waits for 1 in A, 1 for 2 in B, 2 for 0 in C; rank 3 waits in A with rank 0
    s = {0: st(True, {"A:b": 1}, ("A:b", 1, (0, 1, 3))), 1: st(True, {"B:b": 1}, ("B:b", 1, (1, 2))),
         2: st(True, {"C:b": 1}, ("C:b", 1, (2, 0))), 3: st(True, {"A:b": 1}, ("A:b", 1, (0, 1, 3)))}
    assert waitfor.cycle_through(0, s) == [0, 1, 2]
    assert waitfor.cycle_through(3, s) is None  # not on the cycle: its wait ends by a notice of rank 1
    assert waitfor.key([0, 1, 2], s) == ((0, ("A:b", 1)), (1, ("B:b", 1)), (2, ("C:b", 1)))
