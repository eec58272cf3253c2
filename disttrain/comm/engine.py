"""Asynchronous collectives: one communication thread per process, FIFO, and Handles.

Why a thread and not MPI's nonblocking collectives: an MPI_Iallreduce only advances while the
caller is inside MPI, so it stalls exactly while the caller computes - the time overlap is meant
to hide. The communication thread runs the same algorithms as the blocking calls and sits inside
MPI (and numba ``nogil`` reduction kernels) with the GIL released, so a rank that is busy in BLAS or
a numba kernel keeps communicating. It uses each group's private ``async_comm``, so its messages
can never be matched by a blocking collective running on the main thread at the same time.

Operations run in submission order; every rank must submit the same collectives in the same order
(as with any MPI collective). Several may be outstanding; ``wait`` them in any order.
"""
from __future__ import annotations

import atexit
import queue
import threading
import time

from .. import stall, timeline
from ..groups import thread_level_ok
from ..log import logger
from . import config


class Handle:
    """The future of an asynchronous collective.

    ``test()`` returns True once it has completed (never blocks); ``wait()`` blocks until then and
    returns the result array, or raises the collective's exception (e.g. CollectiveError, on every
    rank). Until ``wait`` returns, in-place operations own their input array: do not modify it.
    """

    __slots__ = ("_done", "_result", "_error", "name", "seconds", "t_submit", "t_start", "t_end")

    def __init__(self, name: str = ""):
        self._done = threading.Event()
        self._result = None
        self._error = None
        self.name = name
        self.seconds = 0.0  # how long the collective ran on the communication thread
        # time.perf_counter() when submitted, started and finished (one clock for both threads)
        self.t_submit = time.perf_counter()
        self.t_start = self.t_end = 0.0

    def test(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None):
        if not self._done.wait(timeout):
            raise TimeoutError(f"collective {self.name} did not complete within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result

    def _finish(self, result=None, error=None) -> None:
        self._result, self._error = result, error
        self._done.set()

    def __repr__(self) -> str:
        return f"Handle({self.name}, done={self.test()})"


class Engine:
    """The communication thread. Started on first use, stopped at interpreter exit."""

    def __init__(self):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()  # start-up; submissions; an inline run (excludes submissions)
        self._queued = 0  # operations put on the queue (under _lock)
        self._ran = 0  # operations the thread has finished (written by the thread only)

    def submit(self, fn, name: str = "", x=None, group=None, inline: bool = False) -> Handle:
        """Run ``fn()`` on the communication thread; its return value becomes the handle's result.

        Everything that decides what ``fn`` does on the wire is bound here, on the calling thread:
        the settings snapshot (validation, segment size, cost-model parameters) runs with it, and
        the operation gets its sequence number on `group` now, in submission order - so a switch
        changed or a group created while the handle is outstanding cannot make ranks diverge.

        If MPI did not grant MPI_THREAD_MULTIPLE (some system MPIs), a second thread calling MPI
        would be unsafe: then ``fn`` runs here, synchronously, and a warning says so once.

        ``inline=True`` is for a caller about to wait for the result anyway (DataParallel's last
        bucket): when the thread is idle - nothing queued, nothing running - ``fn`` runs here on
        the calling thread and the handle is complete on return, saving the hand-off (queue, wake
        the thread, wake the waiter: ~0.1-0.2 ms on a busy core). The operations still run in
        submission order on the same communicator, one at a time, so what goes on the wire is the
        same either way and the choice needs no agreement between ranks.
        """
        h = Handle(name)
        op = stall.issue(name + " (async)", x, stall.call_site(), group, lane="a")
        op.state = "queued"
        snap = config.current()
        if self._thread is None:
            if not self._threads_allowed():
                self._run(fn, h, op, snap)
                return h
            self._start()
        with self._lock:
            if inline and self._ran == self._queued:  # idle: run here; the lock holds off other submitters
                self._run(fn, h, op, snap)
                return h
            self._queued += 1
            self._q.put((fn, h, op, snap))
        return h

    def call(self, fn, name: str = ""):
        """Run ``fn()`` in queue order on the communication thread and return its result (here,
        when the thread is not running): for MPI calls on an asynchronous communicator made
        from the main thread (splitting or freeing it)."""
        if self._thread is None or not self._thread.is_alive():
            return fn()
        return self.submit(fn, name).wait()

    _allowed: bool | None = None

    def _threads_allowed(self) -> bool:
        if self._allowed is None:
            self._allowed = thread_level_ok()
            if not self._allowed:
                logger.warning("MPI did not grant MPI_THREAD_MULTIPLE: asynchronous collectives run "
                              "synchronously (no overlap). Use an MPI built with thread support.")
        return self._allowed

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                t = threading.Thread(target=self._loop, name="disttrain-comm", daemon=True)
                t.start()
                self._thread = t
                atexit.register(self.stop)

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            self._run(*item, queued=True)

    def _run(self, fn, h: Handle, op, snap, queued: bool = False) -> None:
        t = h.t_start = time.perf_counter()
        error = None
        try:
            # inside the try: entering can refuse the operation (its group is broken), and that
            # error belongs to the waiter - raised here it would kill the communication thread
            stall.enter(op.name, op=op)
            with config.bound(snap):
                with (timeline.span(h.name, "comm-async", detail=op.detail, site=op.site) if timeline.enabled()
                      else timeline.NULL):
                    result = fn()
        except BaseException as e:  # noqa: BLE001 - delivered to the waiter, re-raised there
            result, error = None, e
        h.t_end = time.perf_counter()
        h.seconds = h.t_end - t
        stall.leave(op, error)
        if queued:  # idle from here on (before the waiter wakes: it may go on with an inline run)
            self._ran += 1
        h._finish(result=result, error=error)

    def stop(self) -> None:
        """Finish queued work and join the thread (before MPI_Finalize)."""
        t = self._thread
        if t is not None and t.is_alive() and t is not threading.current_thread():
            self._q.put(None)
            t.join()
        self._thread = None


engine = Engine()
