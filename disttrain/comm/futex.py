"""Sleep until a peer process changes a word of shared memory: Linux futexes on a shared mapping.

A rank waiting for a peer in a shared-memory round (the counters of an MPI-3 shared window) has
two bad options without this: spin (the waiting thread takes the core a late peer - or this
rank's own training thread - needs) or poll in short sleeps (every wake-up is a context switch on
that core, and the peer's arrival is noticed a timer tick late). ``FUTEX_WAIT`` on the peer's
counter sleeps in the kernel until the peer's ``FUTEX_WAKE`` after it stored the counter (Drepper
2011, "Futexes Are Tricky"; the same word may be waited for by threads of several processes, so the
non-private operations are used). The kernel compares the word with the value the waiter last saw
before it sleeps, so a store that lands between the waiter's look and its wait is never missed.

Only Linux on x86-64 / AArch64 has the system-call numbers below; elsewhere :data:`AVAILABLE` is
False, :func:`wait` sleeps a short fixed time and :func:`wake` does nothing - callers stay
correct (they re-check the word), only slower to notice the store.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys
import time

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine()) if sys.platform == "linux" else None
_WAIT, _WAKE = 0, 1  # FUTEX_WAIT, FUTEX_WAKE (shared: no FUTEX_PRIVATE_FLAG)
_ALL = 0x7FFFFFFF


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _syscall():
    if _SYS_FUTEX is None:
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).syscall
    except OSError:
        return None
    fn.restype = ctypes.c_long  # a ctypes call releases the GIL for its duration: the caller's peers run
    fn.argtypes = [ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int]
    return fn


_call = _syscall()
AVAILABLE = _call is not None


def wait(address: int, seen: int, timeout: float) -> None:
    """Sleep while the 32-bit word at `address` (in shared memory, 4-byte aligned) still holds
    `seen` (its low 32 bits), until a :func:`wake` on it or `timeout` seconds. May return early
    (a signal, a spurious wake-up): the caller re-checks the word.

    Example:
        >>> while counter[0] < k:
        ...     futex.wait(counter.ctypes.data, int(counter[0]), 0.002)
    """
    if _call is None:
        time.sleep(min(timeout, 20e-6))
        return
    ts = _Timespec(int(timeout), int((timeout % 1) * 1e9))
    expected = ctypes.c_int(seen & 0xFFFFFFFF).value  # the kernel compares 32 signed bits
    _call(_SYS_FUTEX, address, _WAIT, expected, ctypes.byref(ts), None, 0)


def wake(address: int) -> None:
    """Wake every thread (of any process) sleeping in :func:`wait` on the word at `address`;
    call it after storing the new value (the system call orders the store before the wake-up)."""
    if _call is not None:
        _call(_SYS_FUTEX, address, _WAKE, _ALL, None, None, 0)
