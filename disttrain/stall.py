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

import functools
import itertools
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback

from . import timeline

TAG_QUERY, TAG_REPLY = 31_001, 31_002
_inflight: dict = {}  # native thread id -> _Op
_last: dict = {}  # native thread id -> (name, seq, finished at)
_counters: dict = {}  # native thread id -> itertools.count
_settings = {"warn": 60.0, "shutdown": 0.0}


class _Op:
    __slots__ = ("name", "seq", "x", "site", "t0", "thread")

    def __init__(self, name, x, site):
        tid = threading.get_native_id()
        self.name, self.x, self.site, self.t0 = name, x, site, time.monotonic()
        self.seq = next(_counters.setdefault(tid, itertools.count(1)))
        self.thread = threading.current_thread().name

    @property
    def detail(self) -> str:  # formatted only when reported: enter() is on every collective's path
        shape, dtype = getattr(self.x, "shape", None), getattr(self.x, "dtype", None)
        return f"shape {tuple(shape)}, {dtype}" if shape is not None else ""

    def describe(self, now) -> str:
        detail = self.detail
        return (f"{self.name} (#{self.seq} on thread {self.thread}{'; ' + detail if detail else ''}) "
                f"for {now - self.t0:.1f} s, called at {self.site}")


def call_site(skip_pkg: str = os.path.dirname(os.path.abspath(__file__))) -> str:
    """file:line of the nearest caller outside disttrain's collectives layer."""
    f = sys._getframe(1)
    comm_dir = os.path.join(skip_pkg, "comm")
    while f is not None and (f.f_code.co_filename.startswith(comm_dir) or f.f_code.co_filename == __file__):
        f = f.f_back
    return f"{f.f_code.co_filename}:{f.f_lineno}" if f is not None else "?"


def enter(name: str, x=None, site: str | None = None) -> _Op:
    op = _Op(name, x, site or call_site())
    _inflight[threading.get_native_id()] = op
    return op


def leave(op: _Op) -> None:
    tid = threading.get_native_id()
    _inflight.pop(tid, None)
    op.x = None  # do not keep the caller's array alive
    _last[tid] = (op.name, op.seq, time.monotonic())


def tracked(name: str):
    """Decorator for a public blocking collective: stall tracking plus a timeline span."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            x = args[0] if args else kw.get("x")
            op = enter(name, x)
            try:
                if timeline.enabled():
                    with timeline.span(name, "comm", detail=op.detail, site=op.site):
                        return fn(*args, **kw)
                return fn(*args, **kw)
            finally:
                leave(op)
        return wrapper
    return deco


def snapshot() -> dict:
    now = time.monotonic()
    ops = [op.describe(now) for op in list(_inflight.values())]
    frame = sys._current_frames().get(threading.main_thread().ident)
    main_at = f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}()" if frame else "?"
    last = max(_last.values(), key=lambda v: v[2], default=None)
    return {"host": socket.gethostname(), "pid": os.getpid(), "ops": ops, "names": [o.name for o in _inflight.values()],
            "main_at": main_at,
            "last": None if last is None else f"{last[0]} #{last[1]}, {now - last[2]:.1f} s ago"}


def set_stall_timeout(seconds: float, shutdown_seconds: float | None = None) -> None:
    """Report collectives waiting longer than `seconds` (0 = off); abort the job after
    `shutdown_seconds` (0 = never; None = unchanged). Set the same values on every rank."""
    _settings["warn"] = float(seconds)
    if shutdown_seconds is not None:
        _settings["shutdown"] = float(shutdown_seconds)


class Watchdog(threading.Thread):
    def __init__(self, world, comm):
        super().__init__(name="disttrain-watchdog", daemon=True)
        self.world, self.comm = world, comm  # comm: a private Dup of the world
        self._halt = threading.Event()
        self._reported: set = set()
        self._rfd = None
        self._wake_r, self._wake_w = os.pipe()  # stop() wakes the select at once

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
                signal.signal(s, lambda *_: None)  # the C handler writes the wakeup fd; we act there
        self._rfd = r

    def _on_signal(self) -> None:
        data = os.read(self._rfd, 64)
        if not data:
            return
        num = data[0]
        name = signal.Signals(num).name if num in signal.Signals._value2member_map_ else str(num)
        names = {t.ident: t.name for t in threading.enumerate()}
        stacks = "".join(f"Thread {names.get(ident, ident)} (most recent call last):\n" + "".join(traceback.format_stack(f))
                         for ident, f in sys._current_frames().items() if ident != threading.get_ident())
        sys.stderr.write(f"[disttrain] rank {self.world.rank}: received {name}; aborting all ranks. "
                         f"Threads at that moment:\n{stacks}")
        sys.stderr.flush()
        time.sleep(0.2)  # let the launcher forward the output before the abort tears the job down
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(128 + num)

    # ------------------------------------------------------------------------------ stalls
    def run(self) -> None:
        while not self._halt.is_set():
            warn = _settings["warn"]
            poll = min(1.0, warn / 4) if warn > 0 else 1.0
            fds = [self._wake_r] + ([self._rfd] if self._rfd is not None else [])
            ready, _, _ = select.select(fds, [], [], poll)
            if self._rfd in ready:
                self._on_signal()
            if self._halt.is_set():
                return
            if self.world.size > 1:
                self._answer()
                if warn > 0:
                    self._check(warn, _settings["shutdown"])

    def _answer(self) -> None:
        from mpi4py import MPI

        st = MPI.Status()
        while self.comm.iprobe(source=MPI.ANY_SOURCE, tag=TAG_QUERY, status=st):
            self.comm.recv(source=st.Get_source(), tag=TAG_QUERY)
            self.comm.send(snapshot(), dest=st.Get_source(), tag=TAG_REPLY)

    def _check(self, warn: float, shutdown: float) -> None:
        now = time.monotonic()
        for op in list(_inflight.values()):
            waited = now - op.t0
            key = (op.thread, op.seq)
            if waited >= warn and key not in self._reported:
                self._reported.add(key)
                self._report(op)
            if shutdown > 0 and waited >= shutdown:
                sys.stderr.write(f"[disttrain] rank {self.world.rank}: {op.name} has waited {waited:.0f} s "
                                 f"(stall shutdown after {shutdown:.0f} s); aborting all ranks\n")
                sys.stderr.flush()
                from mpi4py import MPI

                MPI.COMM_WORLD.Abort(1)

    def _report(self, op: _Op) -> None:
        """Ask every other rank what it is doing (waiting up to a few seconds) and print it all."""
        from mpi4py import MPI

        me, p = self.world.rank, self.world.size
        for r in range(p):
            if r != me:
                self.comm.send(me, dest=r, tag=TAG_QUERY)
        replies, deadline = {}, time.monotonic() + min(10.0, max(2.0, _settings["warn"]))
        st = MPI.Status()
        while len(replies) < p - 1 and time.monotonic() < deadline:
            self._answer()  # others may be asking us at the same moment
            if self.comm.iprobe(source=MPI.ANY_SOURCE, tag=TAG_REPLY, status=st):
                replies[st.Get_source()] = self.comm.recv(source=st.Get_source(), tag=TAG_REPLY)
            else:
                time.sleep(0.02)
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

    def stop(self) -> None:
        self._halt.set()
        os.write(self._wake_w, b"x")
        if self.is_alive():
            self.join(timeout=5)


_watchdog: Watchdog | None = None


def start(world) -> None:
    """Start the watchdog for this process (called by dt.init)."""
    global _watchdog
    env = os.environ
    _settings["warn"] = float(env.get("DISTTRAIN_STALL_SECONDS", _settings["warn"]))
    _settings["shutdown"] = float(env.get("DISTTRAIN_STALL_SHUTDOWN_SECONDS", _settings["shutdown"]))
    _watchdog = Watchdog(world, world.comm.Dup())
    _watchdog.install_signals()
    _watchdog.start()
    import atexit

    atexit.register(_watchdog.stop)
