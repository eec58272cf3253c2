"""Process runtime: MPI start-up, world and node-local topology, groups, abort-on-failure.

One worker process per MPI rank. ``init()`` is idempotent and is called implicitly by every
collective, so custom training loops need not call it - but calling it first installs the
excepthook that turns an uncaught exception in any rank into a prompt, job-wide abort instead of a
job that hangs with N-1 ranks waiting in a collective forever.
"""
from __future__ import annotations

import atexit
import importlib.metadata
import os
import sys
import threading
import time
import traceback

import numpy as np

from . import flight, groups, log, mpi, stall, timeline
from .comm import config, costmodel, fused, node, shm, topology, validate
from .comm.api import allreduce
from .comm.engine import engine
from .errors import CollectiveError
from .groups import (Group, as_group, group_of, local_rank, local_size, rank, size,  # noqa: F401 (re-exported)
                     thread_level_ok, world)
from .log import logger

_lock = threading.Lock()


def _release(g: Group) -> None:
    """How a group's communicators go (Group.free): the cost model forgets them, the blocking one
    is freed now, the asynchronous one on the communication thread after the work queued on it."""
    comm, acomm = g.comm, g.async_comm
    costmodel.forget(comm, acomm)
    shm.forget(comm)
    topology.forget(comm)
    comm.Free()

    def free_async():  # on the communication thread, after the work queued on the communicator
        shm.forget(acomm)
        topology.forget(acomm)
        acomm.Free()

    engine.call(free_async, "free group")


def _agree_free(g: Group) -> bool:
    """Group.free's set-up check: a member that frees the group alone - a ``with new_group(r) as
    g:`` block one rank leaves early by an exception it catches - waited for good in the release's
    untracked collectives while its peers waited in their next call (attack9); now it meets their
    next call on the group and every member raises, or the wait-for graph (stall.py) ends a wait
    in another group's call. A group that can no longer communicate (broken, or a member left)
    is freed locally only: False, and its shared windows stay mapped."""
    if stall.cannot_talk(g.uid, g.ranks):
        return False
    validate.check(g.comm, "Group.free", {}, None, always=True)
    return True


def _check_launcher() -> None:
    """The MPICH wheel cannot join a PMIx launch (Open MPI's mpirun, srun --mpi=pmix): MPICH then
    fails with 'unsupported PMI version PMIx'. Say what to do before MPI starts."""
    env = os.environ
    if "PMIX_RANK" not in env or "PMI_RANK" in env:
        return
    try:
        importlib.metadata.distribution("mpich")
    except Exception:  # noqa: BLE001 - no MPICH wheel: the system MPI decides
        return
    raise RuntimeError("disttrain: this process was started by a PMIx launcher (Open MPI's mpirun, or srun "
                       "--mpi=pmix) but mpi4py uses the MPICH wheel, which speaks only PMI-1/2 ('unsupported PMI "
                       "version PMIx'). Launch with the MPICH wheel's mpiexec (next to this python: "
                       f"{os.path.join(os.path.dirname(sys.executable), 'mpiexec')}), or srun --mpi=pmi2, or use "
                       "your system MPI: pip uninstall mpich (README: Using a system MPI).")


def init() -> "Group":
    """Start the runtime (idempotent) and return the world group.

    Requests MPI_THREAD_MULTIPLE (the asynchronous collectives run on a communication thread) and
    installs an excepthook that prints the failing rank's traceback and aborts the whole job.

    Example:
        >>> import disttrain as dt
        >>> dt.init(); print(dt.rank(), dt.size())
    """
    if groups.ready_world is not None:
        return groups.ready_world
    with _lock:  # another thread's first call waits here until init has finished
        if groups.current() is not None:  # finished, or failed part-way (it raised on every rank)
            return groups.current()
        _check_launcher()
        if _init_refused:  # a rank left before init: MPI's world is not whole (see _arrivals)
            raise CollectiveError(_init_refused)
        MPI = mpi.MPI
        if not MPI.Is_initialized():
            MPI.Init_thread(MPI.THREAD_MULTIPLE)
        cw = MPI.COMM_WORLD
        _arrivals(cw)
        local = cw.Split_type(MPI.COMM_TYPE_SHARED, key=cw.Get_rank())
        w = Group(tuple(range(cw.Get_size())), cw.Get_rank(), cw.Get_size(), cw.Dup(), cw.Dup())
        groups.set_world(w, local)
        log.setup(w.rank)
        _install_abort_hooks()
        try:
            config.load_from_env()
            err = None
        except ValueError as e:
            err = str(e)
        # rank 0's environment decides for every rank (as for DISTTRAIN_FAKE_NODES and the cost
        # model): DISTTRAIN_VALIDATE=0 on one host only left its ranks out of the other ranks'
        # per-collective check - a hang in the first collective; a bad value is an error everywhere
        # The same holds for the two switches below that make a rank communicate: the watchdog
        # (its communicator is a collective Dup of the world) and the timeline (a world barrier).
        # Read on one host only they left the other ranks in MPI_Comm_dup / MPI_Barrier for good
        # (attack9: `mpiexec -n 1 env DISTTRAIN_TIMELINE=t.json python x.py : -n 1 python x.py`)
        # values set from code before init (config.explicit) must agree: rank 0's would otherwise
        # silently override a rank's own choice (call8); every rank derives the same error
        mine = {k: v for k, v in config.explicit.items() if k in config.COLLECTIVE}
        chosen = cw.allgather(mine)
        if err is None and any(c != chosen[0] for c in chosen):
            err = ("set_validation() before dt.init() differs across ranks: "
                   + "; ".join(f"rank {r}: {c or 'not called'}" for r, c in enumerate(chosen)))
        err, values, watchdog, trace = cw.bcast(
            (err, {k: getattr(config.current(), k) for k in config.ENV_FIELDS},
             os.environ.get("DISTTRAIN_NO_ABORT_HOOK") != "1", os.environ.get("DISTTRAIN_TIMELINE", "")), root=0)
        if err:
            raise CollectiveError(err)
        config.update(**values)
        _build_topology(w)
        costmodel.ensure(w.comm, w.async_comm)
        warm = False
        if w.size > 1:  # the same on every rank (the layout is; allreduce's round runs with validation off too)
            # The world's shared control window and the fused round's compiled code now, as MPI_Init
            # sets up its own shared memory, not inside the first collective (issue 16: the first
            # dt.allreduce paid ~0.7 ms for the window, the first at each dtype ~5-160 ms for numba)
            warm = node.prepare(w.comm).single
            if warm:
                node.warmup()
                fused.warmup((np.float32, np.float64))
        _warn_blas_threads(local)
        if watchdog:  # rank 0's environment (broadcast above)
            stall.start(w)  # stall reports, notices, departures, signal -> job-wide abort
        if warm:
            # One real call of the default path, tracked like any other (the same on every rank:
            # `warm` follows from broadcast settings and the node layout). A first execution of
            # the hot path's Python - plan, hash, stall record, the slow wait - ran 5-10x slower
            # than warm code (cold caches, CPython 3.11's first-run specialisation) and made the
            # user's first dt.allreduce cost 200-350 us at P = 2 against 25-60 us after this.
            with stall.unrecorded():
                allreduce(np.zeros(1), group=w)  # explicit: the hot path sees only a ready world
        _install_finalize_hooks(MPI)
        if trace:  # rank 0's DISTTRAIN_TIMELINE (broadcast above); each rank streams its own file of it
            timeline.start(trace)
        groups.mark_ready()
    return w


def creator(kind: str, tag) -> tuple[dict, str | None]:
    """The fields a group's creation agrees on besides its ranks, and this rank's error if any.

    Groups made on several threads pair up across ranks in the order the ranks reach the
    creation: rank 0's thread A made its group with rank 1's thread B when their threads ran in
    another order, and each thread then reduced with the other's data - silently (attack9). MPI
    leaves ordering concurrent communicator creation to the program (MPI 4.0, sec. 11.6.2:
    collectives on one communicator from several threads must be ordered by the user); nothing
    about an unnamed thread says which peer thread is its partner, so a creation off the main
    thread must name itself with ``tag=`` - agreed like the ranks, so swapped creations raise on
    every rank - or it is refused, on every rank."""
    main = threading.current_thread() is threading.main_thread()
    err = None
    if not main and tag is None:
        err = (f"{kind} called from thread {threading.current_thread().name!r}: groups created on threads other "
               f"than the main thread need tag= (any value every rank's matching thread passes), because "
               f"creations on several threads pair up across ranks in arrival order")
    return {"main_thread": main, "tag": tag}, err


def new_group(ranks, *, tag=None) -> Group:
    """Create a sub-group of the world for use as ``group=`` in collectives.

    Collective over the WORLD: every rank calls it with the same ``ranks`` (like
    ``torch.distributed.new_group``); non-members get a Group with ``is_member == False`` and
    rank -1. Group rank i is world rank ``ranks[i]``. Raises CollectiveError on every rank if the
    list is invalid or differs between ranks.

    Args:
        ranks: the members' world ranks, in group-rank order.
        tag: needed when called from a thread other than the main thread (see :func:`creator`):
            a value (str/int) naming this creation, the same on every rank; ranks that pass
            different tags raise CollectiveError instead of pairing two threads' groups.

    Example:
        >>> evens = dt.new_group(range(0, dt.size(), 2))
        >>> if evens.is_member: y = dt.allreduce(x, group=evens)
    """
    w = world()
    fields, err = creator("new_group", tag)
    try:
        ranks = tuple(int(r) for r in ranks)
    except (TypeError, ValueError):
        err, ranks = f"new_group: ranks must be a sequence of ints, got {ranks!r}", ()
    if not err:
        if not ranks:
            err = "new_group: ranks is empty"
        elif len(set(ranks)) != len(ranks):
            err = f"new_group: ranks contains duplicates: {list(ranks)}"
        elif min(ranks) < 0 or max(ranks) >= w.size:
            err = f"new_group: ranks must lie in [0, {w.size}), got {list(ranks)}"
    # always: a set-up call - with validation off, a rank with an error would raise alone while
    # its peers went on into the split below
    validate.check(w.comm, "new_group", {"ranks": ranks, **fields}, err, always=True)
    member = w.rank in ranks
    return split(w, 0 if member else None, ranks.index(w.rank) if member else 0, ranks)


def split(parent: Group, color, key: int, ranks) -> Group:
    """Collective over `parent`: the sub-group of the ranks passing the same `color` (an int;
    None = not a member), ordered by `key`; `ranks` are its members' world ranks in that order.
    Splits both of the parent's communicators (blocking and asynchronous), so the sub-group keeps
    the same separation of traffic. Used by new_group and by parallel/mesh.py.

    The asynchronous communicator is split on the communication thread, in queue order: an
    MPI_Comm_split is a collective on the parent's asynchronous communicator and must not run
    while that thread is inside another collective on it (it would match the wrong messages)."""
    MPI = mpi.MPI
    c = MPI.UNDEFINED if color is None else color
    comm = parent.comm.Split(c, key)
    acomm = engine.call(lambda: parent.async_comm.Split(c, key), "split")
    parent._splits += 1
    ranks = tuple(ranks)
    if color is None:
        return Group(ranks, -1, len(ranks), None, None, uid=f"{parent.uid}.{parent._splits}:-", freed=False)
    g = Group(ranks, comm.Get_rank(), comm.Get_size(), comm, acomm, uid=f"{parent.uid}.{parent._splits}:{color}")
    groups.register(g)
    _build_topology(g)
    costmodel.ensure(comm, acomm)
    return g


def _build_topology(g: Group) -> None:
    """The group's node structure and two-level sub-communicators (comm/topology.py), made here -
    where the group itself is made, in the caller's thread - and for the asynchronous communicator
    on the communication thread in queue order, as its split: never lazily inside a collective."""
    t = topology.build(g.comm)
    engine.call(lambda: topology.build(g.async_comm, like=t), "topology")


def _warn_blas_threads(local) -> None:
    """Several ranks on a host, each with a BLAS pool of one thread per core, oversubscribe the
    cores and make small GEMMs ~100x slower; say so once (launchers/local.sh sets the threads)."""
    n = local.Get_size()
    if n > 1 and local.Get_rank() == 0 and not any(
            os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")):
        share = max(1, (os.cpu_count() or 1) // n)
        logger.warning(f"{n} ranks share this host and no BLAS thread count is set; each BLAS may start "
                       f"{os.cpu_count()} threads. Set OMP_NUM_THREADS={share} (launchers/local.sh does) or compute "
                       "will be much slower.")


# -------------------------------------------------------------------------------- abort on error
def _abort(kind: str, exc_type, exc, tb) -> None:
    MPI = mpi.MPI
    r = MPI.COMM_WORLD.Get_rank() if MPI.Is_initialized() else "?"
    msg = "".join(traceback.format_exception(exc_type, exc, tb))
    sys.stderr.write(f"[disttrain] rank {r}: uncaught exception in {kind}; aborting all ranks\n{msg}")
    sys.stderr.flush()
    sys.stdout.flush()
    flight.dump_on_failure()
    time.sleep(0.2)  # the launcher forwards output asynchronously; an abort at once can drop it
    if MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.COMM_WORLD.Abort(1)
    os._exit(1)


def _install_abort_hooks() -> None:
    if os.environ.get("DISTTRAIN_NO_ABORT_HOOK") == "1":
        return
    prev = sys.excepthook

    def excepthook(exc_type, exc, tb):
        if issubclass(exc_type, KeyboardInterrupt) and mpi.MPI.COMM_WORLD.Get_size() == 1:
            return prev(exc_type, exc, tb)
        _abort("the main thread", exc_type, exc, tb)

    def thread_excepthook(args):
        if args.exc_type is SystemExit:
            return
        _abort(f"thread {args.thread.name if args.thread else '?'}", args.exc_type, args.exc_value, args.exc_traceback)

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook


_shut = False


def shutdown() -> None:
    """Leave the job cleanly, once, before MPI_Finalize: drain the communication thread, tell the
    other ranks this one is leaving (stall.shutdown: a peer still waiting for it ends the job with
    a message naming it instead of hanging), stop the watchdog. Runs at interpreter exit and from
    MPI_Finalize (a COMM_SELF attribute's delete callback, which MPI calls at the start of
    MPI_Finalize - the standard hook for libraries, MPI-4.0 sec. 11.2.4), so a user's explicit
    ``MPI.Finalize()`` also stops every disttrain thread before MPI is gone."""
    global _shut
    if _shut:
        return
    _shut = True
    engine.stop()
    stall.shutdown()


def _install_finalize_hooks(MPI) -> None:
    atexit.register(shutdown)
    keyval = MPI.Comm.Create_keyval(delete_fn=lambda *_: shutdown())
    MPI.COMM_SELF.Set_attr(keyval, 1)


def _launched_rank_size() -> tuple[int, int]:
    """(rank, size) from the launcher's environment (MPICH/Hydra, Open MPI, PMIx, Slurm), or (0, 1)."""
    env = os.environ
    for r, n in (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                 ("PMIX_RANK", "PMIX_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if env.get(r, "").isdigit() and env.get(n, "").isdigit():
            return int(env[r]), int(env[n])
    return 0, 1


#: a rank's first world collective says whether it came to start the runtime or to leave (_arrivals)
_ARRIVED, _LEAVING = 0, 1
_init_refused = ""  # set when init found ranks that had left: a second init must not wait for them
#: what a rank's launcher-side parent is (/proc/PID/comm, at most 15 characters): a process the
#: rank spawns itself inherits the rank's environment but not its connection to the launcher
#: (mpiexec.gforker, MPICH's single-host launcher that ships in the mpich wheel, starts the ranks itself)
_LAUNCHER_PARENTS = frozenset({"hydra_pmi_proxy", "prted", "orted", "slurmstepd", "mpiexec.gforker"})
#: set by a rank at ``import disttrain`` to its pid, inherited by every process it starts: a process
#: that finds it on its way up to the launcher is the rank's child (subprocess, os.system,
#: multiprocessing), not a rank - though it has the rank's PMI_RANK/PMI_SIZE (and, without close_fds,
#: its PMI_FD: MPI_Init there connected to the launcher as that rank; attack8)
_RANK_MARK = "DISTTRAIN_RANK_PID"
_HOPS = 8  # ancestors looked at: wrappers (a shell script, timeout, a Python launcher script) are few


def _arrivals(cw) -> None:
    """The world's first collective: every rank says whether it arrived to start the runtime or is
    leaving the program without having called dt.init() (:func:`_leave_before_init`, at its exit).
    A rank that exited before init otherwise left the others inside MPI_Init forever: MPICH's
    Hydra does not end a job whose process exits before MPI_Init, with status 0 or not, and no
    collective of theirs could ever complete. Now every arriving rank raises, naming those that left."""
    global _init_refused
    left = [r for r, s in enumerate(cw.allgather(_ARRIVED)) if s == _LEAVING]
    if left:
        _init_refused = (f"rank(s) {left} of {cw.Get_size()} ended their program without calling dt.init(): "
                         "under a launcher every rank must start the runtime (or none)")
        raise CollectiveError(_init_refused)


def _parent(pid: int) -> tuple:
    """(command name, parent pid) of process `pid` from /proc ((None, 0) where it cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None, 0
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses - it ends at the last ')'
    return stat[stat.index("(") + 1:stat.rindex(")")], int(stat[stat.rindex(")") + 2:].split()[1])


def _lineage() -> str:
    """What this process is under a launcher, from its ancestors (up to _HOPS): "rank" when the
    launcher's proxy comes first - directly its parent, or through wrappers (``mpiexec ./run.sh``,
    ``mpiexec timeout 600 python ...``), whose ranks the parent's name alone missed, and whose
    early exit then left the others in dt.init() forever (attack8); "child" when a disttrain rank
    comes first (its _RANK_MARK): a process the rank started; "unknown" otherwise (a launcher not
    in _LAUNCHER_PARENTS, no /proc)."""
    mark, pid = os.environ.get(_RANK_MARK), os.getppid()
    for _ in range(_HOPS):
        if mark is not None and str(pid) == mark:
            return "child"
        name, ppid = _parent(pid)
        if name is None:
            return "unknown"
        if name in _LAUNCHER_PARENTS:
            return "rank"
        if ppid <= 1:
            return "unknown"
        pid = ppid
    return "unknown"


def _leave_before_init(r: int, pid: int) -> None:
    """At the exit of a rank that never called dt.init() (its script's end, or sys.exit with any
    status: MPICH's Hydra ends a job for neither while the others wait in MPI_Init): take part in
    the world's first collective as a leaving rank (:func:`_arrivals`), so that ranks waiting in
    dt.init() raise instead of waiting forever. When every rank leaves (a script that used no
    collective), nobody raises: MPI starts and ends without a word."""
    if groups.current() is not None or os.getpid() != pid:  # a child forked by the rank: not a rank
        return
    m = sys.modules.get("mpi4py.MPI")
    if m is not None and (m.Is_initialized() or m.Is_finalized()):
        return  # the program ran MPI itself (mpi4py) without the runtime: its business
    MPI = mpi.MPI
    if not MPI.Is_initialized():
        MPI.Init_thread(MPI.THREAD_MULTIPLE)
    states = MPI.COMM_WORLD.allgather(_LEAVING)
    if _ARRIVED in states:
        sys.stderr.write(f"[disttrain] rank {r}: left its program without calling dt.init() while ranks "
                         f"{[i for i, s in enumerate(states) if s == _ARRIVED]} started the runtime; they raise\n")
        sys.stderr.flush()
    MPI.Finalize()


def install_early_abort_hook() -> None:
    """At ``import disttrain``, under a launcher with more than one rank, a rank that ends before
    ``dt.init()`` ends the job instead of leaving the other ranks waiting in init forever:
    - an uncaught exception aborts the whole job (MPI is started just to call MPI_Abort); dt.init()
      replaces this excepthook with the full one;
    - any other exit (the script's end, sys.exit) of the rank the launcher started (directly or
      through wrappers: :func:`_lineage`) joins the world's first collective as a leaving rank: the
      ranks in dt.init() raise, naming it (:func:`_arrivals`).
    A process a rank starts (subprocess, os.system, multiprocessing) gets neither: it is no rank.
    DISTTRAIN_NO_ABORT_HOOK=1 turns both off."""
    if os.environ.get("DISTTRAIN_NO_ABORT_HOOK") == "1":
        return
    r, n = _launched_rank_size()
    if n <= 1:
        return
    kind, pid = _lineage(), os.getpid()
    if kind == "child":  # started by a rank: its exit and its exceptions are its own (see _RANK_MARK)
        return
    os.environ[_RANK_MARK] = str(pid)  # what the processes this rank starts find on their way up
    if kind == "rank":
        atexit.register(_leave_before_init, r, pid)
    if sys.excepthook is not sys.__excepthook__:
        return

    def early(exc_type, exc, tb):
        # a child forked by the rank (os.fork without exec) is no rank either
        if groups.current() is not None or issubclass(exc_type, KeyboardInterrupt) or os.getpid() != pid:
            return sys.__excepthook__(exc_type, exc, tb)
        msg = "".join(traceback.format_exception(exc_type, exc, tb))
        sys.stderr.write(f"[disttrain] rank {r}: uncaught exception before dt.init(); aborting all ranks\n{msg}")
        sys.stderr.flush()
        time.sleep(0.2)
        MPI = mpi.MPI
        if not MPI.Is_finalized():
            MPI.COMM_WORLD.Abort(1)
        os._exit(1)

    sys.excepthook = early


groups.install(init, _release, _agree_free)

# config.set_validation agrees on the world once initialised (comm/ cannot import the runtime)
config.install(validate.agree_setting)
# timeline.start / stop begin with the world's set-up check (the timeline sits below comm/)
timeline.install(lambda what, err: validate.check(groups.world().comm, what, {}, err, always=True))
