"""A freed group's shared-memory windows (the pipeline channel's pool, the shared gradient
buckets' pool: both keyed by the group's uid) given back in ``Group.free``.

A group's uid is new for every split ("<parent>.<n>:<color>"), so a program that builds and frees
groups in a loop made a new pool each time, and every window of every freed group stayed mapped
until the process exited (attack8: the channel's; the buckets' alike). ``MPI_Win_free`` is
collective over the window's communicator (all of whose ranks are group members), so the release
runs inside ``Group.free``, which every member calls at the same point, and the set released is
agreed: a window goes only if it is idle on EVERY member. One that a live array still views on some
member (a layer's cached input in a channel slot, a parameter's ``.grad`` in a bucket row) cannot
be unmapped under it, and after the group is gone there is no later point all members are known to
reach: it stays mapped until the process exits and is counted in :func:`stranded`.
"""
from __future__ import annotations

from ..errors import CollectiveError

_stranded = [0]  # windows of freed groups still mapped (in use on some member at free)


def give_back(group, pool: list, idle, release) -> None:
    """Release the windows of `pool` that ``idle(w)`` says are unused on every member of `group`
    (collective over ``group.comm``: one allgather, also for an empty pool, so every member takes
    the same decision); the others are counted as stranded."""
    mine = [int(bool(idle(w))) for w in pool]
    everyone = group.comm.allgather(mine)
    if any(len(f) != len(mine) for f in everyone):  # pools are made collectively: a bug, not input
        _stranded[0] += len(pool)
        raise CollectiveError(f"Group.free: the members hold different numbers of shared windows for group "
                              f"{group.uid!r} ({[len(f) for f in everyone]}); none was released")
    for k, w in enumerate(pool):
        if all(f[k] for f in everyone):
            release(w)
        else:
            _stranded[0] += 1
    pool.clear()


def stranded() -> int:
    """How many windows of freed groups stayed mapped because an array still used them."""
    return _stranded[0]
