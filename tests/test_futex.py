"""comm/futex.py: a wait on a shared word ends when another process stores it and wakes it,
not only at its timeout; a store before the wait is never missed."""
import mmap
import os
import time

import numpy as np
import pytest

from disttrain.comm import futex

pytestmark = pytest.mark.skipif(not futex.AVAILABLE, reason="no futex system call on this platform")


def _shared_word():
    m = mmap.mmap(-1, 4096, flags=mmap.MAP_SHARED)  # shared with a forked child, as a shared window is
    word = np.frombuffer(m, np.int64, count=1)
    word[0] = 0
    return m, word


def test_wait_ends_when_another_process_stores_and_wakes():
    m, word = _shared_word()
    pid = os.fork()
    if pid == 0:  # the peer: store the new value late, then wake
        try:
            time.sleep(0.2)
            word[0] = 1
            futex.wake(word.ctypes.data)
        finally:
            os._exit(0)
    t = time.monotonic()
    while word[0] == 0:
        futex.wait(word.ctypes.data, int(word[0]), 5.0)
    woke = time.monotonic() - t
    os.waitpid(pid, 0)
    assert word[0] == 1
    assert 0.1 < woke < 4.0, f"woke after {woke:.3f} s: not by the peer's wake (store at 0.2 s, timeout 5 s)"
    del word
    m.close()


def test_a_changed_word_returns_at_once_and_an_unchanged_one_at_the_timeout():
    m, word = _shared_word()
    word[0] = 7
    t = time.monotonic()
    futex.wait(word.ctypes.data, 6, 5.0)  # the caller saw 6, the word holds 7: the store is not missed
    assert time.monotonic() - t < 1.0
    t = time.monotonic()
    futex.wait(word.ctypes.data, 7, 0.05)  # nobody wakes it: back after the timeout
    assert 0.04 < time.monotonic() - t < 2.0
    futex.wake(word.ctypes.data)  # no sleeper: harmless
    del word
    m.close()
