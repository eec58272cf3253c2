"""Stall inspector and signal watchdog: one background thread per rank.

Distributed bugs hang: a rank skips a collective, ranks call collectives in different orders, a
rank is stuck in a long computation. Every public collective records what this rank is in (name,
n-th call on this thread, shape/dtype, the caller's file:line); when one has waited longer than
``stall_seconds`` (default 60 s), the watchdog asks every other rank - point to point, on a
private communicator - what *it* is doing and prints one report naming the ranks that have not
arrived and where each rank is (Horovod's stall inspector, done with MPI messages instead of a
coordinator). After ``stall_shutdown_seconds`` (default off) it aborts the job.

The same thread turns SIGTERM / SIGINT / SIGHUP into a prompt job-wide abort with every thread's
traceback, even while the main thread is blocked inside MPI (a Python signal handler would only
run when MPI returns): the handler just wakes the watchdog through ``signal.set_wakeup_fd``.

Environment (read by ``dt.init()``): DISTTRAIN_STALL_SECONDS (0 = off),
DISTTRAIN_STALL_SHUTDOWN_SECONDS (0 = never). Code: ``dt.set_stall_timeout(warn, shutdown)``.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback

from . import flight, groups, mpi, timeline, waitfor
from .errors import CollectiveError

TAG_QUERY, TAG_REPLY, TAG_NOTICE = 31_001, 31_002, 31_003
_inflight: dict = {}  # native thread id -> _Op running on that thread
_last: dict = {}  # thread id -> the _Op it finished last
_settings = {"warn": 60.0, "shutdown": 0.0}
_gseq: dict = {}  # group key -> number of collectives this rank has issued on it (the n-th call)
_done: dict = {}  # group key -> number of them finished here (sent to peers when this rank leaves)
_peer_failed: dict = {}  # world rank -> [(message, its _gseq, time, gkey, sig, its groups, number)]: its failure notices
NOTICES_KEPT = 64  # per rank (the newest)
_departed: dict = {}  # world rank -> (its _done, monotonic time): the rank left MPI (exited)
_asked = threading.local()  # .sig: what this thread's last peers_problem asked (validate.wait's call)
P2P_DEPARTED_GRACE = 5.0  # seconds a point-to-point wait on a rank that has left may still complete
_broken: dict = {}  # group uid -> why: a collective on it was abandoned half-way; never usable again
_cycle: dict = {}  # group key -> (seq, why): this rank's call there is in a confirmed circular wait


# The keys of _inflight / _last only tell threads apart: pthread_self (get_ident) costs ~30 ns,
# get_native_id a gettid system call (~1 us here, three times per collective: issue 16).
_tid = threading.get_ident


class _Names(threading.local):
    name = None  # a class default: reading it needs no getattr fallback (every record reads it)


_names = _Names()


def _thread_name() -> str:
    """This thread's name, looked up once per thread (current_thread().name costs ~0.5 us)."""
    name = _names.name
    if name is None:
        name = _names.name = threading.current_thread().name
    return name


alarm = 0  # bumped whenever a notice arrives: waiting loops re-check only when it changed
_lock = threading.Lock()


def _uid(gkey: str) -> str:
    return gkey.rpartition(":")[0] if gkey else ""



class _Op:
    """One collective or point-to-point operation of this rank: what, where, when, state.

    The same object is the stall inspector's in-flight record and the flight recorder's entry
    (flight.py keeps the last N). Made on every collective's path (issue 16: at 8 B the record
    was a quarter of the call), so it stores only what is at hand and formats nothing: the call
    site is a string, or - from the hot path - the caller's code object and instruction offset,
    turned into "file:line" only when a report reads ``site``; the blocking-time decision is
    made once here (``blocks``), not with string tests in leave()."""

    __slots__ = ("name", "seq", "gkey", "ranks", "shape", "dtype", "algorithm", "where", "lasti", "t_enq", "t0",
                 "t1", "state", "thread", "blocks")

    def __init__(self, name, shape, dtype, where, lasti, gkey, ranks, asynchronous=False):
        self.name = name
        self.shape = shape
        self.dtype = dtype
        self.where = where  # "file:line", or a code object whose line is at offset `lasti` (site)
        self.lasti = lasti
        self.algorithm = ""
        self.t_enq = self.t0 = _now()
        self.t1 = 0.0
        self.state = "running"
        t = _names.name  # _thread_name(), inlined: one call fewer per record
        self.thread = t = t if t is not None else _thread_name()
        # the main thread's time inside blocking operations (an asynchronous one runs elsewhere,
        # or inline for a caller that waits on its handle: not counted either way, as before)
        self.blocks = t == "MainThread" and not asynchronous
        self.gkey = gkey
        self.ranks = ranks
        if gkey:
            # No lock: one group's lane is driven by one thread at a time (concurrent collectives on
            # one communicator from two threads are erroneous MPI), and the GIL keeps dicts whole.
            self.seq = _gseq[gkey] = _gseq.get(gkey, 0) + 1
        else:
            self.seq = 0
        if flight._on:
            flight._buf.append(self)

    @property
    def site(self) -> str:
        w = self.where
        return w if type(w) is str else _format_site(w, self.lasti)

    @property
    def detail(self) -> str:  # formatted only when reported: enter() is on every collective's path
        return f"shape {tuple(self.shape)}, {self.dtype}" if self.shape is not None else ""

    def describe(self, now) -> str:
        detail = self.detail
        g = f" of group {self.gkey}" if self.gkey else ""
        return (f"{self.name} (#{self.seq}{g} on thread {self.thread}{'; ' + detail if detail else ''}) "
                f"for {now - self.t0:.1f} s, called at {self.site}")

    def as_dict(self) -> dict:
        return {"name": self.name, "group": self.gkey, "ranks": list(self.ranks), "seq": self.seq,
                "shape": None if self.shape is None else list(self.shape),
                "dtype": None if self.dtype is None else str(self.dtype), "algorithm": self.algorithm,
                "site": self.site, "enqueue": self.t_enq, "start": self.t0, "end": self.t1 or None,
                "state": self.state, "thread": self.thread}


_now = time.monotonic
_COMM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "comm")
# Both caches are keyed by id(code): a code object's own hash is computed from its contents
# (name, bytecode, constants) on every lookup - ~0.1 us for a small function, ~1 us for a module
# body - and the hot path looked two up per call. _skip keeps every code object it has seen
# alive (as the code-keyed cache did), so an id is never reused while it is a key.
_skip: dict = {}  # id(code) -> (code, True if it belongs to the collectives layer: skipped)
_sites: dict = {}  # (id(code), line or -1 - offset) -> "file:line" (formatting costs more than the lookup)


def call_site(depth: int = 1) -> str:
    """file:line of the nearest caller outside disttrain's collectives layer (on every call's
    path: the per-code decisions and the formatted strings are cached). `depth`: where to start
    looking, when the caller knows how many of its own frames to skip - since CPython 3.11
    every frame a walk passes through is materialised as an object (~0.4 us each), and
    ``sys._getframe(depth)`` materialises only the one it returns."""
    return _site_of(sys._getframe(depth))


def _skipped(c) -> bool:
    e = _skip.get(id(c))
    if e is None:
        e = _skip[id(c)] = (c, c.co_filename.startswith(_COMM_DIR) or c.co_filename == __file__)
    return e[1]


def _site_of(f) -> str:
    """call_site from frame `f` on."""
    while f is not None:
        c = f.f_code
        if not _skipped(c):
            key = (id(c), f.f_lineno)
            site = _sites.get(key)
            if site is None:
                site = f"{c.co_filename}:{f.f_lineno}"
                if len(_sites) < 100_000:
                    _sites[key] = site
            return site
        f = f.f_back
    return "?"


def _format_site(code, lasti: int) -> str:
    """"file:line" of the instruction at byte offset `lasti` of `code` (what frame.f_lineno
    computes from frame.f_lasti - done here only when a report needs it)."""
    key = (id(code), -1 - lasti)  # offsets, kept apart from call_site's line numbers
    site = _sites.get(key)
    if site is None:
        line = code.co_firstlineno
        for start, end, ln in code.co_lines():
            if start <= lasti < end and ln is not None:
                line = ln
                break
        site = f"{code.co_filename}:{line}"
        if len(_sites) < 100_000:
            _sites[key] = site
    return site


def issue(name: str, x=None, site: str | None = None, group=None, lane: str = "b") -> _Op:
    """Record an operation issued by this rank (it gets its group sequence number now)."""
    return _Op(name, getattr(x, "shape", None), getattr(x, "dtype", None), site or call_site(), 0,
               f"{group.uid}:{lane}" if group is not None else "", group.ranks if group is not None else (),
               name.endswith("(async)"))


def enter(name: str, x=None, site: str | None = None, group=None, lane: str = "b", op: _Op | None = None) -> _Op:
    """This thread starts `op` (or a new one): it is now in flight, visible to the stall inspector."""
    if op is None:
        op = issue(name, x, site, group, lane)
    else:
        op.t0, op.state, op.thread = _now(), "running", _thread_name()
    _inflight[_tid()] = op
    if _departed or _broken:
        _check_peers(op)
    return op


def enter_from(f, name: str, shape, dtype, gkey: str, ranks) -> _Op:
    """enter() for the hot path (comm/api.py), which has the caller's frame `f`, the group's
    key and members, and the array's shape and dtype at hand: the site is kept as the frame's
    code object and instruction offset (formatted when read; a frame inside the collectives
    layer is walked past now, as call_site does)."""
    c = f.f_code
    e = _skip.get(id(c))
    if e is not None and not e[1]:
        op = _Op(name, shape, dtype, c, f.f_lasti, gkey, ranks)
    else:
        op = _Op(name, shape, dtype, _site_of(f), 0, gkey, ranks)
    _inflight[_tid()] = op  # the two lines enter() ends with: one call fewer on the hot path
    if _departed or _broken:
        _check_peers(op)
    return op


blocking_seconds = 0.0  # seconds the main thread spent inside tracked operations (all exposed)
# The newest of those operations (each one's t0, t1 is a span on the monotonic clock - the clock of
# time.perf_counter too on Linux and macOS (CPython's _PyTime_GetPerfCounter), which the
# communication thread's handles use: DataParallel subtracts where the two overlap (blocking_windows).
blocking_spans: collections.deque = collections.deque(maxlen=4096)
_ONE_CLOCK = time.get_clock_info("monotonic").implementation == time.get_clock_info("perf_counter").implementation


def blocking_windows(since: float) -> list:
    """The main thread's blocking spans (start, end) that end after `since` (perf_counter
    seconds), oldest first - disjoint, one thread runs them one after another; [] where the two
    clocks differ."""
    if not _ONE_CLOCK:
        return []
    out = []
    for op in reversed(blocking_spans):
        if op.t1 <= since:
            break
        out.append((op.t0, op.t1))
    out.reverse()
    return out


def leave(op: _Op, error: BaseException | None = None) -> None:
    global blocking_seconds
    tid = _tid()
    _inflight.pop(tid, None)
    t1 = op.t1 = _now()
    if op.blocks:
        blocking_seconds += t1 - op.t0
        blocking_spans.append(op)  # the record itself is the span: no tuple per call
    op.state = "done" if error is None else f"error: {type(error).__name__}"
    gkey = op.gkey
    if gkey and op.seq > _done.get(gkey, 0):
        _done[gkey] = op.seq
    _last[tid] = op


def current() -> _Op | None:
    """The operation this thread is inside (None outside a tracked collective)."""
    return _inflight.get(_tid())


@contextlib.contextmanager
def unrecorded():
    """Run set-up collectives that leave no trace in what users read and count: group sequence
    numbers, finished counts, blocking time and the flight record are as before the block. For
    dt.init's warm-up call only (runtime.py), which every rank makes identically; the node
    state's round counter it advances is internal and advances alike on every rank."""
    global blocking_seconds
    seq, done, last, blocking = dict(_gseq), dict(_done), dict(_last), blocking_seconds
    # the newest entries, by identity: a deque already at its maxlen drops its oldest on append,
    # so its length would not tell what the block added
    tails = [(d, d[-1] if d else None) for d in (flight._buf, blocking_spans)]
    try:
        yield
    finally:
        blocking_seconds = blocking
        for d, tail in tails:
            while d and d[-1] is not tail:
                d.pop()
        for now, before in ((_gseq, seq), (_done, done), (_last, last)):
            now.clear()
            now.update(before)


def tracked(name: str):
    """Decorator for a public blocking collective: stall tracking, flight record, timeline span.

    ``group`` is keyword-only in every collective. An invalid group
    cannot be agreed on with the group it was meant for (this rank does not know it), so it is
    announced to every rank (notify_failure): members waiting for this rank in a collective
    raise the same CollectiveError instead of waiting forever."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            x = args[0] if args else kw.get("x")
            group = kw.get("group")
            try:
                g = groups.as_group(group)
            except Exception as e:  # noqa: BLE001 - TypeError / CollectiveError from as_group
                raise bad_group(group, name, e, "b", x) from None
            op = enter(name, x, group=g)
            try:
                if timeline.enabled():
                    with timeline.span(name, "comm", detail=op.detail, site=op.site):
                        out = fn(*args, **kw)
                else:
                    out = fn(*args, **kw)
            except BaseException as e:
                leave(op, e)
                raise
            leave(op)
            return out
        return wrapper
    return deco




# ------------------------------------------------------------------------- failure notices
def bad_group(group, kind: str, err: Exception, lane: str, x=None):
    """The exception for an invalid ``group=``. A group this rank is simply not a member of keeps
    nobody waiting (its members do not expect this rank): a local CollectiveError. Otherwise (a
    freed group, or not a Group at all) the group's members may be waiting for this rank, which
    cannot agree on the error with them: it is announced to every rank (undeliverable)."""
    uid = getattr(group, "uid", None)
    site = call_site()
    sig = _sig_of(kind, getattr(x, "shape", None), getattr(x, "dtype", None), site)
    if getattr(group, "freed", False):
        return undeliverable(f"{kind}: {err}", site, f"{uid}:{lane}", sig)
    if uid is not None and not getattr(group, "is_member", True):
        return CollectiveError(f"{kind}: {err}")
    return undeliverable(f"{kind}: {err}", site, None, sig)


def undeliverable(msg: str, site: str = "?", gkey: str | None = None, sig: tuple | None = None):
    """A CollectiveError for an error this rank cannot agree on with its group (it does not know
    the group, or the group is unusable): announced to every rank first, so that peers waiting
    for this rank raise too (validate.wait) instead of hanging. `gkey`: the group the call was
    meant for, when known. Returns the exception to raise."""
    w = groups.current()
    me = w.rank if w is not None else "?"
    full = f"rank {me}: {msg} (called at {site})"
    notify_failure(full, gkey, sig)
    return CollectiveError(full)


def notify_failure(msg: str, gkey: str | None = None, sig: tuple | None = None) -> None:
    """Tell every other rank that this rank failed a call (meant for group `gkey`, None =
    unknown; `sig` = (collective, shape, dtype) of the call) without its group's agreement."""
    w = _watchdog
    if w is None or w.world.size == 1:
        return
    # How many calls this rank had ISSUED on each group lane, not finished: the failed call would
    # have been the next one, also while an earlier asynchronous call of it is still in flight
    # (its peers wait in call issued + 1; counting finished calls missed them - a hang the
    # fuzzer found on emulated nodes).
    issued = dict(_gseq)
    # the groups this rank belongs to now: a notice never concerns a group created after it
    uids = sorted({g.uid for g in groups.registered()})
    global _notices
    _notices += 1  # names this notice: a "broken" notice retires exactly the notice it used
    w.notify(("failed", msg, issued, gkey, sig, uids, _notices))


def _sig_of(name: str, shape, dtype, site: str) -> tuple:
    return (name.replace(" (async)", "").replace("_async_", "").replace("_async", "").rstrip("_"),
            None if shape is None else tuple(shape), None if dtype is None else str(dtype), site)


#: A failure notice that does not say which group the call was meant for (``group=`` was not a
#: Group at all) interrupts a waiting collective only if it is the same collective, with the same
#: shape and dtype, called from the same line of the program (SPMD code calls one collective
#: from one line on every rank; a different line is a different call), and the failed rank had
#: issued every earlier call of that group (the failed call would have been its next). Such a
#: notice is used up by the first wait it interrupts and forgotten after UNKNOWN_GROUP_TTL
#: seconds; a failed rank that joins a collective whose peers already gave up on it ends the job
#: (Watchdog._check_broken). Ambiguous by nature: a member of another group that makes the same
#: call from the same line next may take the notice for its own call; that job then ends with
#: the failed rank's message (docs/ARCHITECTURE.md sec. 7), never hangs.
UNKNOWN_GROUP_TTL = 30.0


def peers_problem(ranks, gkey: str, seq: int | None, since: float = 0.0, sig: tuple | None = None) -> str | None:
    """Why the `seq`-th collective of group `gkey` (members `ranks`; `sig` = its collective,
    shape, dtype) can never complete, or None: the group is broken, a member failed this very
    call (see UNKNOWN_GROUP_TTL), or a member left before finishing it. seq None (set-up
    checks, not numbered): only notices received after `since` count."""
    _asked.sig = sig  # for consume_unknown, called next on this thread when this wait gives up
    why = _broken.get(_uid(gkey)) if gkey else None
    if why:
        return why
    c = _cycle.get(gkey) if _cycle and gkey else None
    if c is not None and c[0] == seq:
        return c[1]
    now = time.monotonic()
    for r in ranks:
        # every notice of r still pending: a rank can fail several calls in a row before its
        # peers reach the first (one kept per rank lost the earlier ones: a hang)
        fs = _keep(r, lambda f: f[3] is not None or now - f[2] <= UNKNOWN_GROUP_TTL) if r in _peer_failed else ()
        for f in fs:
            if f[3] in (None, gkey) and _uid(gkey) in f[5] and (
                    f[3] is not None or not _went_on(f[1], _uid(gkey))) and (
                    (f[1].get(gkey, 0) == seq - 1) if seq is not None else f[2] >= since) and (
                    f[3] is not None or (sig is not None and f[4] == sig)):
                if f[3] is None:
                    _keep(r, lambda g, f=f: g is not f)  # used up
                    _used_up.append((r, f[6]))
                return f[0]
        d = _departed.get(r)
        if d is not None and (seq is None or d[0].get(gkey, 0) < seq):
            return f"rank {r} has left the job (exited) without taking part in this collective"
    return None


def _went_on(issued: dict, uid: str) -> bool:
    """Has this rank finished a call on group `uid` (either lane) that the failed rank issued
    only after its failure (`issued`: its counts then)? Then its notice is stale for that group.
    Sequence numbers, not times: a call issued before the failure may finish after the notice
    arrived (an asynchronous call whose peers came late)."""
    return any(_done.get(f"{uid}:{lane}", 0) > issued.get(f"{uid}:{lane}", 0) for lane in "ab")


def consume_unknown(ranks) -> None:
    """A wait of this rank was given up: the failure notices of `ranks` that named no group have
    done their work (one failed call interrupts one wait per rank: the oldest notice of each rank
    whose notice this wait did not already use - of this very call, when the wait's signature is
    known: a wait given up because its group is broken must not eat the notice of the rank's NEXT
    failed call, meant for another group)."""
    used = {r for r, _ in _used_up}  # this wait used their notice already (peers_problem)
    sig = getattr(_asked, "sig", None)  # the signature this thread's last peers_problem asked about
    for r in ranks:
        for f in _peer_failed.get(r, ()) if r not in used else ():
            if f[3] is None and (sig is None or f[4] == sig):
                _keep(r, lambda g, f=f: g is not f)  # the oldest: one failed call, one wait
                break


def _keep(r: int, keep) -> list:
    """Keep only the notices of rank `r` that `keep` accepts (no entry when none is left, so
    that waits stop looking); the watchdog thread appends under the same lock."""
    with _lock:
        fs = [f for f in _peer_failed.get(r, ()) if keep(f)]
        if fs:
            _peer_failed[r] = fs
        else:
            _peer_failed.pop(r, None)
    return fs


_used_up: list = []  # (rank, notice number) of unknown-group failure notices this rank used: told with "broken"
_notices = 0  # failure notices this rank has sent


def cannot_talk(uid: str, ranks) -> str | None:
    """Why a group can no longer communicate - broken after an abandoned collective, or a member
    (world ranks `ranks`) left the job - else None (Group.free then releases locally only)."""
    return _broken.get(uid) or next((f"rank {r} has left the job" for r in ranks if r in _departed), None)


def mark_broken(gkey: str, why: str) -> None:
    """A collective on `gkey` was abandoned half-way (its MPI request can never complete): every
    later call on the group is refused here, and the peers are told so that one that went on
    alone into the abandoned call ends the job instead of hanging (Watchdog._check_broken)."""
    uid = _uid(gkey)
    if uid and uid not in _broken:
        fix = "create a new group" if uid != "w" else "the world group cannot be replaced: end the job"
        _broken[uid] = f"the group {uid} is unusable after an abandoned collective ({why}); {fix}"
        used = list(_used_up)
        _used_up.clear()
        if _watchdog is not None and _watchdog.world.size > 1:
            _watchdog.notify(("broken", uid, _broken[uid], used))


def _check_peers(op: _Op) -> None:
    """At entry: a collective on a broken group, or with a departed member, can never complete."""
    if not op.gkey:
        return
    why = _broken.get(_uid(op.gkey))
    if why:
        _inflight.pop(_tid(), None)
        op.state = "refused"
        raise CollectiveError(f"{op.name}: {why}")


def snapshot() -> dict:
    now = time.monotonic()
    ops = [op.describe(now) for op in list(_inflight.values())]
    frame = sys._current_frames().get(threading.main_thread().ident)
    main_at = f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}()" if frame else "?"
    last = max(_last.values(), key=lambda o: o.t1, default=None)
    return {"host": socket.gethostname(), "pid": os.getpid(), "ops": ops, "names": [o.name for o in _inflight.values()],
            "main_at": main_at,
            "last": None if last is None else f"{last.name} #{last.seq}, {now - last.t1:.1f} s ago",
            "wait": wait_state(frame)}


_ENGINE = os.path.join(_COMM_DIR, "engine.py")


def wait_state(frame=None) -> dict:
    """This rank's part of the wait-for graph (waitfor.py): is the main thread blocked (inside a
    tracked call, or in an asynchronous handle's wait() without a timeout - waiting for the
    communication thread), how many calls it issued per group lane, and its calls in flight."""
    if frame is None:
        frame = sys._current_frames().get(threading.main_thread().ident)
    live = [o for o in list(_inflight.values()) if o.state in ("running", "validating")]
    blocked = any(o.thread == "MainThread" for o in live)
    f, depth = frame, 0
    while not blocked and f is not None and depth < 8:  # Condition.wait <- Event.wait <- Handle.wait
        c = f.f_code
        blocked = c.co_name == "wait" and c.co_filename == _ENGINE and f.f_locals.get("timeout") is None
        f, depth = f.f_back, depth + 1
    return {"blocked": blocked, "issued": dict(_gseq),
            "ops": [(o.gkey, o.seq, tuple(o.ranks), f"{o.name} #{o.seq} of group {o.gkey} (called at {o.site})")
                    for o in live if o.gkey]}


def set_stall_timeout(seconds: float, shutdown_seconds: float | None = None) -> None:
    """Report collectives waiting longer than `seconds` (0 = off); abort the job after
    `shutdown_seconds` (0 = never; None = unchanged). Set the same values on every rank."""
    _settings["warn"] = float(seconds)
    if shutdown_seconds is not None:
        _settings["shutdown"] = float(shutdown_seconds)


def abort_job(msg: str, code: int = 1) -> None:
    """Print `msg`, dump the flight record, and abort every rank (MPI_Abort)."""
    MPI = mpi.MPI
    sys.stderr.write(msg if msg.endswith("\n") else msg + "\n")
    sys.stderr.flush()
    flight.dump_on_failure()
    time.sleep(0.2)  # let the launcher forward the output before the abort tears the job down
    if MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.COMM_WORLD.Abort(code)
    os._exit(code)


class Watchdog(threading.Thread):
    """Per-rank background thread: answers peers' stall queries, receives failure and departure
    notices, reports stalls, turns signals into job-wide aborts, and aborts the job when this rank
    waits for a peer that has left."""

    POLL = 0.1  # s between checks for notices (an iprobe: negligible)

    def __init__(self, world, comm):
        super().__init__(name="disttrain-watchdog", daemon=True)
        self.world, self.comm = world, comm  # comm: a private Dup of the world
        self._halt = threading.Event()
        self._reported: set = set()
        self._rfd = None
        self._owned: dict = {}  # signal number -> the no-op handler this thread acts for
        self._wake_r, self._wake_w = os.pipe()  # stop() wakes the select at once
        self._sends: list = []  # outstanding notice sends (completed before the comm is freed)

    # ---------------------------------------------------------------------------- signals
    def install_signals(self) -> None:
        """Route SIGTERM/SIGINT/SIGHUP to this thread (main thread only; keeps user handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            old = signal.set_wakeup_fd(w)
        except ValueError:
            return
        if old != -1:  # someone else (asyncio, ...) owns it: leave signals alone
            signal.set_wakeup_fd(old)
            return
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            if signal.getsignal(s) in (signal.SIG_DFL, signal.default_int_handler):
                # the C handler writes the wakeup fd; we act there
                self._owned[int(s)] = h = lambda *_: None
                signal.signal(s, h)
        self._rfd = r

    def _on_signal(self) -> None:
        data = os.read(self._rfd, 64)
        # The wakeup fd carries EVERY signal Python's C handler saw, also those the program
        # handles itself (Slurm's --signal=USR1 to checkpoint before the time limit, a SIGALRM
        # timeout): those ran their own handler in the main thread and are not ours to act on -
        # nor is one of ours whose handler the program has replaced since (review6: a user's
        # SIGALRM handler aborted the whole job).
        mine = [n for n in data if n in self._owned and signal.getsignal(n) is self._owned[n]]
        if not mine:
            return
        num = mine[0]
        name = signal.Signals(num).name if num in signal.Signals._value2member_map_ else str(num)
        names = {t.ident: t.name for t in threading.enumerate()}
        stacks = "".join(f"Thread {names.get(ident, ident)} (most recent call last):\n" + "".join(traceback.format_stack(f))
                         for ident, f in sys._current_frames().items() if ident != threading.get_ident())
        abort_job(f"[disttrain] rank {self.world.rank}: received {name}; aborting all ranks. "
                  f"Threads at that moment:\n{stacks}", 128 + num)

    # ------------------------------------------------------------------------------ stalls
    def run(self) -> None:
        while not self._halt.is_set():
            fds = [self._wake_r] + ([self._rfd] if self._rfd is not None else [])
            ready, _, _ = select.select(fds, [], [], self.POLL)
            if self._rfd in ready:
                self._on_signal()
            if self._halt.is_set():
                return
            if self.world.size > 1:
                self._answer()
                self._check_departed()
                if _broken:
                    self._check_broken()
                warn = _settings["warn"]
                if warn > 0:
                    self._check(warn, _settings["shutdown"])
                    self._check_cycles(warn)

    def notify(self, msg) -> None:
        """Send a notice to every other rank (non-blocking; any thread)."""
        me = self.world.rank
        reqs = [self.comm.isend(msg, dest=r, tag=TAG_NOTICE) for r in range(self.world.size) if r != me]
        with _lock:
            self._sends = [q for q in self._sends if not q.Test()] + reqs

    def _answer(self) -> None:
        global alarm
        MPI = mpi.MPI
        st = MPI.Status()
        while self.comm.iprobe(source=MPI.ANY_SOURCE, tag=TAG_QUERY, status=st):
            q = self.comm.recv(source=st.Get_source(), tag=TAG_QUERY)
            rep = snapshot()
            rep["q"] = q  # the asker's round: a late answer to an earlier round is told apart
            self.comm.send(rep, dest=st.Get_source(), tag=TAG_REPLY)
        while self.comm.iprobe(source=MPI.ANY_SOURCE, tag=TAG_NOTICE, status=st):
            src = st.Get_source()
            note = self.comm.recv(source=src, tag=TAG_NOTICE)
            now = time.monotonic()
            if note[0] == "failed":
                with _lock:
                    fs = _peer_failed.setdefault(src, [])
                    fs.append((note[1], note[2], now, note[3], note[4], set(note[5]), note[6]))
                    del fs[:-NOTICES_KEPT]
            elif note[0] == "departed":
                _departed[src] = (note[1], now)
            elif note[0] == "broken":
                _broken.setdefault(note[1], note[2])
                for r, n in note[3]:  # that failure notice has served: it must not interrupt anything else
                    _keep(r, lambda f, n=n: f[6] != n)  # only that very notice, not a newer one of r's
            alarm += 1

    def _check_departed(self) -> None:
        """A rank that waits for a peer that has left would wait forever: end the job now, naming it."""
        if not _departed:
            return
        now = time.monotonic()
        for op in list(_inflight.values()):
            for r in op.ranks:
                d = _departed.get(r)
                # a point-to-point wait (no group: the pipeline's receives name their source in
                # `ranks`) has no call count to compare: a message the source sent before it left
                # has arrived after P2P_DEPARTED_GRACE seconds, or never will
                if d is not None and (d[0].get(op.gkey, 0) < op.seq if op.gkey else now - d[1] > P2P_DEPARTED_GRACE):
                    abort_job(f"[disttrain] rank {self.world.rank}: rank {r} has left the job (its process exited "
                              f"or called MPI_Finalize) but this rank is waiting for it in "
                              f"{op.describe(time.monotonic())}; aborting all ranks")

    def _check_broken(self) -> None:
        """A collective running on a group whose peers abandoned it can never complete."""
        now = time.monotonic()
        for op in list(_inflight.values()):
            why = _broken.get(_uid(op.gkey))
            if why and now - op.t0 > 1.0 and op.state == "running":
                abort_job(f"[disttrain] rank {self.world.rank}: waiting in {op.describe(now)}, but {why}; "
                          "aborting all ranks")

    def _check(self, warn: float, shutdown: float) -> None:
        now = time.monotonic()
        for op in list(_inflight.values()):
            waited = now - op.t0
            key = (op.thread, op.seq, op.gkey)
            if waited >= warn and key not in self._reported:
                self._reported.add(key)
                self._report(op)
                flight.dump_on_failure()
            if shutdown > 0 and waited >= shutdown:
                abort_job(f"[disttrain] rank {self.world.rank}: {op.name} has waited {waited:.0f} s "
                          f"(stall shutdown after {shutdown:.0f} s); aborting all ranks")

    _round = 0  # queries this watchdog has sent (each answer carries its round)

    def _ask(self) -> dict:
        """Ask every other rank what it is doing; wait up to a few seconds. Returns rank -> its
        snapshot() (ranks that did not answer in time are absent)."""
        MPI = mpi.MPI
        me, p = self.world.rank, self.world.size
        self._round += 1
        q = (me, self._round)
        for r in range(p):
            if r != me:
                self.comm.send(q, dest=r, tag=TAG_QUERY)
        replies, deadline = {}, time.monotonic() + min(10.0, max(2.0, _settings["warn"]))
        st = MPI.Status()
        while len(replies) < p - 1 and time.monotonic() < deadline:
            self._answer()  # others may be asking us at the same moment
            if self.comm.iprobe(source=MPI.ANY_SOURCE, tag=TAG_REPLY, status=st):
                rep = self.comm.recv(source=st.Get_source(), tag=TAG_REPLY)
                if rep.get("q") == q:
                    replies[st.Get_source()] = rep
            else:
                time.sleep(0.02)
        return replies

    _next_look = 0.0  # monotonic time of the next look for a circular wait
    _suspect = None  # (waitfor.key of a circular wait, monotonic time first seen) - not yet confirmed

    def _check_cycles(self, warn: float) -> None:
        """End a circular wait (waitfor.py) that this rank is part of. Looked for once a call has
        waited `warn` seconds; declared only when a second look, at least max(warn, 1) s later,
        finds the very same calls in the cycle (answers are taken at slightly different moments:
        a rank that was between two calls must not be accused). Then every call of another rank
        that waits for this rank gets a failure notice (their waits raise; validate.wait), and
        this rank's own waiting call raises the same message (peers_problem, via _cycle)."""
        global alarm
        if self._ended is not None:
            self._check_ended()
        now = time.monotonic()
        if not any(now - o.t0 >= warn and o.state in ("running", "validating") and o.gkey
                   for o in list(_inflight.values())):
            self._suspect = None
            return
        if now < self._next_look:
            return
        self._next_look = now + max(warn, 1.0)  # one look per grace period: queries cost every rank
        me = self.world.rank
        states = {r: rep.get("wait") for r, rep in self._ask().items()}
        states[me] = wait_state()
        path = waitfor.cycle_through(me, states)
        if path is None:
            self._suspect = None
            return
        k = waitfor.key(path, states)
        if self._suspect is None or self._suspect[0] != k:
            self._suspect = (k, time.monotonic())
            return
        self._suspect = None
        why = f"rank {me}: " + waitfor.describe(me, path, states)
        sys.stderr.write(f"[disttrain] {why}; ending the calls of the cycle with CollectiveError\n")
        sys.stderr.flush()
        g = waitfor.edges(states)
        for gkey in sorted({e[0] for r, es in g.items() if r != me for s, e in es.items() if s == me}):
            notify_failure(why, gkey, None)  # the calls of others that wait for this rank
        mine = g.get(me, {})
        for gkey, seq, _ in mine.values():
            _cycle[gkey] = (seq, why)
        alarm += 1
        # an interruptible wait (validate.wait) ends within its 0.1 s recheck; one inside the
        # algorithm (validation off) looks at no notice: the job ends if it is still there
        self._ended = ({e[:2] for e in mine.values()}, time.monotonic() + 2 * max(warn, 1.0), why)

    _ended = None  # (the calls of a confirmed cycle, when they must have ended, why)

    def _check_ended(self) -> None:
        calls, deadline, why = self._ended
        if time.monotonic() < deadline:
            return
        self._ended = None
        if any((o.gkey, o.seq) in calls and o.state in ("running", "validating") for o in list(_inflight.values())):
            abort_job(f"[disttrain] {why}; its wait could not be interrupted (validation off?): aborting all ranks")

    def _report(self, op: _Op) -> None:
        """Ask every other rank what it is doing (waiting up to a few seconds) and print it all."""
        me, p = self.world.rank, self.world.size
        replies = self._ask()
        now = time.monotonic()
        lines = [f"[disttrain] stall: rank {me} has been waiting in {op.describe(now)}"]
        missing = []
        for r in range(p):
            if r == me:
                continue
            rep = replies.get(r)
            if rep is None:
                lines.append(f"[disttrain]   rank {r}: no answer (busy without releasing the GIL, or gone)")
                missing.append(r)
                continue
            where = f"rank {r} ({rep['host']} pid {rep['pid']})"
            if op.name in rep["names"]:
                lines.append(f"[disttrain]   {where}: also in " + "; ".join(rep["ops"]))
            else:
                missing.append(r)
                now_in = "in " + "; ".join(rep["ops"]) if rep["ops"] else "in no collective (last finished: " \
                    f"{rep['last'] or 'none'})"
                lines.append(f"[disttrain]   {where}: has NOT arrived - {now_in}; main thread at {rep['main_at']}")
        if any(r < me and op.name in rep["names"] for r, rep in replies.items()):
            return  # a lower rank waiting in the same collective prints the report
        lines.append(f"[disttrain]   ranks missing from {op.name}: {missing or 'none (all inside: slow or mismatched arguments)'}")
        sys.stderr.write("\n".join(lines) + "\n")
        sys.stderr.flush()

    # --------------------------------------------------------------------------- leaving
    def depart(self) -> None:
        """This rank is leaving MPI (exit or MPI_Finalize): tell every rank how far it got on each
        group, then wait until all ranks have left. A peer still waiting for it in a collective it
        never finished learns that within POLL seconds and ends the job, naming this rank; peers
        that are merely still working keep going (this rank waits, answering stall queries)."""
        with _lock:
            done = dict(_done)
        self.notify(("departed", done))
        req = self.comm.Ibarrier()
        while not req.Test():
            time.sleep(0.005)
        MPI = mpi.MPI
        with _lock:
            sends = list(self._sends)
        # Bounded: a notice or stall answer to a peer that has already stopped receiving (its own
        # depart finished first) never completes once it is too large to go eagerly - the suite
        # hung here at exit after the circular-wait answers grew. Every rank has passed the
        # barrier above, so nothing left in flight can matter to anyone: cancel it and go.
        deadline = time.monotonic() + DEPART_SEND_GRACE
        while sends and not MPI.Request.Testall(sends):
            if time.monotonic() > deadline:
                for r in sends:
                    try:
                        r.Cancel()
                    except Exception:  # noqa: BLE001, S110 - already complete or not cancellable: leaving anyway
                        pass
                break
            time.sleep(0.005)

    def stop(self) -> None:
        self._halt.set()
        os.write(self._wake_w, b"x")
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5)


_watchdog: Watchdog | None = None
#: seconds depart() waits for its own last sends before cancelling them (see depart)
DEPART_SEND_GRACE = 2.0


def start(world) -> None:
    """Start the watchdog for this process (called by dt.init)."""
    global _watchdog
    env = os.environ
    _settings["warn"] = float(env.get("DISTTRAIN_STALL_SECONDS", _settings["warn"]))
    _settings["shutdown"] = float(env.get("DISTTRAIN_STALL_SHUTDOWN_SECONDS", _settings["shutdown"]))
    _watchdog = Watchdog(world, world.comm.Dup())
    _watchdog.install_signals()
    _watchdog.start()


def shutdown() -> None:
    """Leave the job cleanly (called once, before MPI_Finalize): depart, then stop the watchdog and
    free its communicator, so that no thread of ours calls MPI after finalize."""
    global _watchdog
    w, _watchdog = _watchdog, None
    if w is None:
        return
    try:
        if w.world.size > 1:
            w.depart()
    finally:
        w.stop()
        try:
            w.comm.Free()
        except Exception:  # noqa: BLE001 - finalizing anyway
            pass
