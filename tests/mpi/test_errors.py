"""Bad input raises CollectiveError on EVERY rank, with a message naming the ranks - no hang, no
silently wrong data - and the group stays usable afterwards."""
import threading

import numpy as np
import pytest

import disttrain as dt
from disttrain.comm import config

pytestmark = pytest.mark.mpi


def still_works(comm):
    """No stray message of the failed call may linger: a correct collective must follow."""
    p = comm.Get_size()
    for alg in ("ring", "butterfly", "mpi"):
        assert np.all(dt.allreduce(np.ones(1000, np.float32), algorithm=alg) == p)


def raises_everywhere(comm, fn, match):
    with pytest.raises(dt.CollectiveError, match=match) as e:
        fn()
    msgs = comm.allgather(str(e.value))
    assert len(set(msgs)) == 1, f"ranks raised different messages: {msgs}"
    still_works(comm)
    return msgs[0]


@pytest.mark.mpi(min_size=2)
def test_mismatched_shape_names_the_ranks(comm):
    r = comm.Get_rank()
    msg = raises_everywhere(comm, lambda: dt.allreduce(np.ones(4 if r == 0 else 5), algorithm="ring"), "shape")
    assert "ranks [0]" in msg and "(4,)" in msg and "(5,)" in msg


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("field,call", [
    ("dtype", lambda r: dt.allreduce(np.ones(3, np.float32 if r else np.float64))),
    ("op", lambda r: dt.allreduce(np.ones(3), op="sum" if r else "max")),
    ("algorithm", lambda r: dt.allreduce(np.ones(3), algorithm="ring" if r else "tree")),
    ("root", lambda r: dt.broadcast(np.ones(3), root=0 if r else 1)),
    ("shape", lambda r: dt.broadcast_(np.ones(3 + (r == 1)), root=0)),
    ("shape", lambda r: dt.reduce_scatter(np.ones((2 + r, 2)))),
    ("trailing_shape", lambda r: dt.allgather(np.ones((2, 1 + (r == 1))))),
    ("dtype", lambda r: dt.alltoall(np.ones(comm_size(), np.int32 if r else np.int64))),
])
def test_mismatched_arguments(comm, field, call):
    r = comm.Get_rank()
    raises_everywhere(comm, lambda: call(r), field)


def comm_size():
    return dt.size()


@pytest.mark.mpi(min_size=2)
def test_different_collectives_at_the_same_point(comm):
    r = comm.Get_rank()
    call = (lambda: dt.allreduce(np.ones(2))) if r == 0 else (lambda: dt.broadcast(np.ones(2)))
    raises_everywhere(comm, call, "different collectives")


@pytest.mark.mpi(min_size=2)
def test_unknown_name_on_one_rank_raises_on_all(comm):
    r = comm.Get_rank()
    msg = raises_everywhere(comm, lambda: dt.allreduce(np.ones(2), algorithm="rign" if r == 1 else "ring"),
                            "unknown allreduce algorithm")
    assert "rank(s) [1]" in msg


@pytest.mark.parametrize("call,match", [
    (lambda: dt.allreduce(np.ones(2), op="mean"), "unknown op"),
    (lambda: dt.allreduce(np.ones(2), algorithm="bogus"), "unknown allreduce algorithm"),
    (lambda: dt.allreduce(np.ones(2), algorithm="ring:2"), "takes no parameter"),
    (lambda: dt.allreduce(np.ones(2, np.complex64)), "unsupported dtype"),
    (lambda: dt.allreduce(np.array(["a"], dtype=object)), "unsupported dtype"),
    (lambda: dt.allreduce_([1.0, 2.0]), "NumPy array"),
    (lambda: dt.broadcast(np.ones(2), root=dt.size()), "root must be"),
    (lambda: dt.broadcast(np.ones(2), root="0"), "root must be"),
    (lambda: dt.reduce_scatter(np.float32(3.0)), "at least 1 dimension"),
    (lambda: dt.alltoall(np.ones(3), splits=[1] * (dt.size() + 1)), "entries"),
    (lambda: dt.alltoall(np.ones(3), splits=[2] + [0] * (dt.size() - 1)), "sum to"),
    (lambda: dt.alltoall(np.ones(3), splits=[-1, 4] + [0] * (dt.size() - 2) if dt.size() > 1 else [-1]),
     "non-negative|sum to"),
    (lambda: dt.alltoall(np.ones(3), splits="abc"), "sequence of ints|entries"),
    (lambda: dt.allgather(np.ones(2), algorithm="bruck"), "unknown allgather algorithm"),
])
def test_bad_arguments(comm, call, match):
    raises_everywhere(comm, call, match)


def test_readonly_array_in_place(comm):
    x = np.ones(3)
    x.setflags(write=False)
    raises_everywhere(comm, lambda: dt.allreduce_(x), "writeable")


@pytest.mark.mpi(min_size=2)
def test_bad_arguments_on_one_rank_only(comm):
    r = comm.Get_rank()
    splits = [1] * comm.Get_size()
    if r == 1:
        splits = [2] * comm.Get_size()  # does not sum to the rows on rank 1 only
    msg = raises_everywhere(comm, lambda: dt.alltoall(np.ones(comm.Get_size()), splits=splits), "sum to")
    assert "rank(s) [1]" in msg


def test_new_group_validation(comm):
    p = comm.Get_size()
    raises_everywhere(comm, lambda: dt.new_group([0, 0]), "duplicates")
    raises_everywhere(comm, lambda: dt.new_group([p]), r"must lie in")
    raises_everywhere(comm, lambda: dt.new_group([]), "empty")
    if p > 1:
        r = comm.Get_rank()
        raises_everywhere(comm, lambda: dt.new_group([0] if r else [1]), "ranks")
        g = dt.new_group([0])
        if r != 0:
            with pytest.raises(dt.CollectiveError, match="not a member"):
                dt.allreduce(np.ones(1), group=g)


def test_validation_off_still_reports_local_errors(comm):
    dt.set_validation(False)
    with pytest.raises(dt.CollectiveError, match="unknown op"):
        dt.allreduce(np.ones(2), op="mean")  # every rank makes the same mistake: no hang possible
    assert config.settings.validate is False
    dt.set_validation(True)
    still_works(comm)


class _Interrupt(Exception):
    pass


def _raise_interrupt(*_):
    raise _Interrupt()


@pytest.mark.mpi(min_size=2)
def test_a_wait_interrupted_on_one_rank_makes_the_group_unusable_on_every_rank(comm):
    """review6: an exception that is not the runtime's own (here a user's SIGALRM handler) out of
    rank 0's wait for late peers left the call half-done but the group usable: the next calls
    went on, a chunked fused call could fold a stale chunk. The group is now broken everywhere."""
    import signal
    import time

    from disttrain.errors import CollectiveError

    g = dt.new_group(range(comm.Get_size()))
    if comm.Get_rank() == 0:
        old = signal.signal(signal.SIGALRM, _raise_interrupt)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            with pytest.raises(_Interrupt):
                dt.allreduce(np.ones(4), group=g)  # the peers come only after 0.4 s
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        with pytest.raises(CollectiveError, match="unusable"):
            dt.allreduce(np.ones(4), group=g)
    else:
        time.sleep(0.4)
        with pytest.raises(CollectiveError):
            for _ in range(2):
                dt.allreduce(np.ones(4), group=g)
    np.testing.assert_array_equal(dt.allreduce(np.ones(2)), np.full(2, comm.Get_size()))  # the world is fine


@pytest.mark.mpi(min_size=2)
def test_a_timeline_started_or_stopped_on_one_rank_only_raises_everywhere(comm, tmp_path_factory):
    """attack9: timeline.start / stop are collective (a world barrier; stop streams to rank 0) but
    were not checked: a rank that called one alone waited in the barrier, its peers in their next
    collective - for good. Now they begin with the world's set-up check."""
    r = comm.Get_rank()
    path = comm.bcast(str(tmp_path_factory.mktemp("tl") / "t.json") if r == 0 else None)

    def start_on_last_rank_only():
        if r == comm.Get_size() - 1:
            dt.timeline.start(path)
        dt.allreduce(np.ones(3))
    raises_everywhere(comm, start_on_last_rank_only, "timeline.start")
    assert not dt.timeline.enabled()
    dt.timeline.start(path)  # every rank: fine

    def stop_on_last_rank_only():
        if r == comm.Get_size() - 1:
            dt.timeline.stop()
        dt.allreduce(np.ones(3))
    raises_everywhere(comm, stop_on_last_rank_only, "timeline.stop")
    assert dt.timeline.enabled()
    out = dt.timeline.stop()  # every rank: the merged trace on rank 0
    assert not dt.timeline.enabled() and (out is not None) == (r == 0)


@pytest.mark.mpi(min_size=2)
def test_calibrate_on_one_rank_only_raises_everywhere(comm):
    """attack9: dt.calibrate (a Barrier and timed exchanges) called by one rank alone waited for
    good, untracked, while the peers waited in their next collective; it now begins with the
    group's set-up check (broadcast_optimizer_state's: tests/mpi/test_data_parallel.py)."""
    r, last = comm.Get_rank(), comm.Get_size() - 1

    def calibrate_on_last_rank_only():
        if r == last:
            dt.calibrate()
        dt.allreduce(np.ones(3))
    raises_everywhere(comm, calibrate_on_last_rank_only, "calibrate")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("tagged,swapped", [(False, False), (True, True), (True, False)])
def test_groups_made_on_threads_agree_on_their_tag_or_raise(comm, tagged, swapped):
    """attack9: groups made on two threads paired up across ranks in arrival order - rank 0's thread
    A with rank 1's thread B - and each thread then reduced the other's data, silently. A group
    made off the main thread now needs tag=, agreed like the ranks: untagged creations raise on
    every rank, tags met in swapped order raise, tags in the same order give each thread its own
    sum (oracle: the closed form of the per-rank values)."""
    r, p = comm.Get_rank(), comm.Get_size()
    base = {"A": 1.0, "B": 100.0}
    res, created = {}, threading.Event()
    first = "B" if swapped and r % 2 else "A"  # the thread that creates its group first on this rank

    def worker(name):
        if name != first:
            created.wait(60)
        try:
            g = dt.new_group(range(p), tag=name if tagged else None)
        except dt.CollectiveError as e:
            res[name] = str(e)
            return
        finally:
            if name == first:
                created.set()
        res[name] = float(dt.allreduce(np.full(4, base[name] + r), group=g)[0])
        g.free()

    threads = [threading.Thread(target=worker, args=(n,), name=f"maker-{n}") for n in "AB"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    if tagged and not swapped:
        assert res == {n: base[n] * p + p * (p - 1) / 2 for n in "AB"}
    else:
        assert set(res) == {"A", "B"} and all(isinstance(v, str) for v in res.values()), res
        assert all(("tag=" if not tagged else "tag") in v for v in res.values()), res
    still_works(comm)


@pytest.mark.mpi(min_size=2)
def test_a_group_made_on_the_main_thread_of_one_rank_and_a_thread_of_another_raises(comm):
    """The creating thread's kind (main or not) is agreed too, tag or no tag."""
    out = {}

    def make():
        try:
            dt.new_group(range(comm.Get_size()), tag="t")
        except dt.CollectiveError as e:
            out["e"] = str(e)
    if comm.Get_rank() == 0:
        make()
    else:
        t = threading.Thread(target=make)
        t.start()
        t.join(120)
    assert "main_thread" in out.get("e", ""), out
    still_works(comm)


@pytest.mark.mpi(min_size=2)
def test_a_group_freed_on_one_rank_only_raises_everywhere(comm):
    """attack9: Group.free on one member alone (a `with new_group(r) as g:` block that one rank
    leaves early through an exception it catches) waited for good in the release's untracked
    collectives, its peers in their next call on the group. Free now begins with the group's
    set-up check: every member raises, the group stays usable, and a free by all then works."""
    r, p = comm.Get_rank(), comm.Get_size()
    g = dt.new_group(range(p))
    np.testing.assert_array_equal(dt.allreduce(np.ones(3), group=g), np.full(3, float(p)))

    def free_on_last_rank_only():
        if r == p - 1:
            g.free()
        dt.allreduce(np.ones(3), group=g)
    raises_everywhere(comm, free_on_last_rank_only, "Group.free")
    assert not g.freed
    np.testing.assert_array_equal(dt.allreduce(np.ones(3), group=g), np.full(3, float(p)))
    g.free()
    assert g.freed
