"""Groups of ranks and the world: the layer every other layer addresses ranks through.

Below the collectives (comm/), the stall inspector and the flight recorder, which all take a Group;
above them, ``runtime`` starts MPI, creates the world and the groups, and tears them down. This
module holds the state they share - the world Group, the node-local communicator, the map from
MPI communicator to Group - and imports nothing of disttrain but the leaf modules, so the arrows
point down. Two things only the runtime knows are installed by it at import time (``install``):
how to start when a collective is called before ``dt.init()``, and how a group's communicators are
released (on the communication thread, after its queued work).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from . import mpi
from .errors import CollectiveError

_world: "Group | None" = None
# The world once init has finished (what other threads and the hot path see). Until then only the
# initialising thread (_owner) sees _world: a user thread's collective that met init's own
# collectives on the world's communicators mismatched them ("Message truncated", an abort; attack5).
ready_world: "Group | None" = None
_owner: "int | None" = None
_local = None  # node-local communicator (ranks sharing memory)
_by_handle: dict = {}  # MPI communicator handle -> Group (both of a group's communicators)
_start = None  # () -> Group: the runtime's init, installed by install()
_release = None  # (Group) -> None: frees a group's communicators, installed by install()
_agree = None  # (Group) -> bool: Group.free's set-up check (False: talk to nobody), installed by install()


_on_free: list = []  # (Group) -> None, run by every member in Group.free while its communicators live


def on_free(fn) -> None:
    """Register fn(group), run on every member inside ``Group.free`` (collective, the same point on
    every member) before the communicators go: what a module keeps per group - e.g. shared-memory
    windows keyed by the group's uid - is given back there, by collectives over ``group.comm``."""
    _on_free.append(fn)


def install(start, release, agree) -> None:
    """Called once by the runtime: how to start on first use, how to release a group, and how its
    members agree that they all free it (the runtime's validate sits above this module)."""
    global _start, _release, _agree
    _start, _release, _agree = start, release, agree


def set_world(world: "Group", local) -> None:
    """Record the world group and the node-local communicator (runtime.init)."""
    global _world, _local, _owner
    _world, _local, _owner = world, local, threading.get_ident()
    register(world)


def mark_ready() -> None:
    """Publish the world to every thread (the end of runtime.init)."""
    global ready_world
    ready_world = _world


def register(g: "Group") -> None:
    """Make the group findable from either of its communicators (``group_of``)."""
    _by_handle[g.comm.handle] = _by_handle[g.async_comm.handle] = g


def registered() -> list:
    """Every live group of this rank that disttrain created (world included), once each."""
    return list({id(g): g for g in _by_handle.values()}.values())


@dataclass(eq=False)
class Group:
    """A set of ranks that run collectives together (``group=`` in every collective).

    Attributes:
        ranks: world ranks of the members, in group-rank order.
        rank: this process's rank in the group (-1 if it is not a member).
        size: number of members.
        comm: the MPI communicator for blocking collectives (a private duplicate, so disttrain's
            messages never match a user's own point-to-point traffic).
        async_comm: a second duplicate used only by the communication thread, so asynchronous and
            blocking collectives in flight at the same time can never match each other's messages.
        uid: a name for the group that is the same on every member ("w" for the world,
            "<parent uid>.<n>:<color>" for the n-th split of a parent): keys the per-group call
            sequence numbers of validation and the flight recorder.

    ``free()`` (collective over the members) releases the communicators; ``with dt.new_group(r)
    as g:`` frees on exit. A freed group is refused by every collective.
    """

    ranks: tuple
    rank: int
    size: int
    comm: object = field(repr=False, default=None)
    async_comm: object = field(repr=False, default=None)
    uid: str = "w"
    freed: bool = False
    _splits: int = field(repr=False, default=0)

    @property
    def is_member(self) -> bool:
        return self.comm is not None

    def __repr__(self) -> str:
        return f"Group(ranks={list(self.ranks)}, rank={self.rank}, size={self.size})"

    def __enter__(self) -> "Group":
        return self

    def __exit__(self, *exc) -> bool:
        self.free()
        return False

    def free(self) -> None:
        """Release the group's communicators (collective over its members; idempotent).

        Asynchronous collectives already submitted on the group finish first: the asynchronous
        communicator is freed on the communication thread, in queue order."""
        if self.freed:
            return
        if self is _world:
            raise ValueError("the world group cannot be freed")
        if self.comm is None:
            self.freed = True
            return
        talk = _agree(self)  # raises on every member if one frees alone; False: the group is dead
        self.freed = True
        try:
            for fn in _on_free if talk else ():  # registration order: the same on every rank (imports)
                fn(self)
        finally:
            _by_handle.pop(self.comm.handle, None)
            _by_handle.pop(self.async_comm.handle, None)
            _release(self)
        self.comm = self.async_comm = None
        self.rank = -1


def group_of(comm) -> "Group | None":
    """The Group owning an MPI communicator (None for one disttrain did not create)."""
    return _by_handle.get(comm.handle)


def current() -> "Group | None":
    """The world group if the runtime has started, else None (never starts it)."""
    return _world


def world() -> Group:
    """The group of all ranks (starts the runtime on first use; another thread's call while init
    runs waits for init to finish)."""
    w = ready_world
    if w is not None:
        return w
    if _world is not None and threading.get_ident() == _owner:
        return _world
    return _start()


def rank() -> int:
    """This process's rank in the world."""
    return world().rank


def size() -> int:
    """Number of ranks in the world."""
    return world().size


def local_rank() -> int:
    """This process's rank among the ranks on the same host (shared-memory node)."""
    world()
    return _local.Get_rank()


def local_size() -> int:
    """Number of ranks on this host."""
    world()
    return _local.Get_size()


def thread_level_ok() -> bool:
    """True when MPI granted MPI_THREAD_MULTIPLE (needed for truly asynchronous collectives)."""
    MPI = mpi.MPI
    return MPI.Query_thread() >= MPI.THREAD_MULTIPLE


def as_group(group) -> Group:
    """Resolve ``group=`` (None -> world); a non-member group is an error."""
    if group is None:
        return world()
    if not isinstance(group, Group):
        raise TypeError(f"group must be a disttrain Group or None, got {type(group).__name__}")
    if not group.is_member:
        if group.freed:
            raise CollectiveError(f"{group!r} was freed")
        raise CollectiveError(f"this rank ({rank()}) is not a member of {group!r}")
    return group
