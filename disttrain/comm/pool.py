"""Recycled result and work buffers for the collectives, keyed by size, bounded.

A fresh large NumPy array is a fresh ``mmap``: the first write to each 4 KiB page takes a page
fault, and a 16 MiB result costs ~4000 of them (more than the collective itself at 1 MiB: issue
16). The pool keeps the buffers it handed out and hands one out again once nobody uses it any
more - which it sees from the reference count: every array made from a pooled buffer (views,
reshapes, slices) holds a reference to it, so a buffer whose only references are the pool's own
is free. The caller gets a normal, new array each time ("collectives return a new array",
DESIGN.md sec. 3); nothing it keeps is ever reused.

Small arrays (< MIN_BYTES) come from ``np.empty``: the allocator's free lists already recycle them
without page faults. The pool holds at most LIMIT_BYTES; past that it hands out unpooled arrays.
"""
from __future__ import annotations

import sys
import threading

import numpy as np

MIN_BYTES = 64 << 10
LIMIT_BYTES = 512 << 20
_PER_SIZE = 4  # buffers kept per size: a result kept by the caller plus one in flight, with slack


class Pool:
    """Buffers by byte size; ``empty(shape, dtype)`` is ``np.empty`` that skips the page faults
    when a buffer of that size was used and dropped before.

    Example:
        >>> out = pool.empty((1024, 1024), np.float32)   # recycled once an earlier result is dropped
    """

    def __init__(self, limit: int = LIMIT_BYTES):
        self.limit = limit
        self.held = 0
        self._free: dict = {}  # nbytes -> [uint8 base arrays]
        self._lock = threading.Lock()  # the main and the communication thread both allocate

    def empty(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        n = 1
        for d in (shape if isinstance(shape, tuple) else (shape,)):
            n *= d
        nbytes = n * dtype.itemsize
        if nbytes < MIN_BYTES:
            return np.empty(shape, dtype)
        with self._lock:
            bases = self._free.get(nbytes)
            if bases is None:
                bases = self._free[nbytes] = []
            for base in bases:
                # the list's reference, this loop's and getrefcount's own: nobody else holds it
                if sys.getrefcount(base) == 3:
                    return base.view(dtype).reshape(shape)
            base = np.empty(nbytes, np.uint8)
            if self.held + nbytes > self.limit:
                self._evict(nbytes)
            if len(bases) < _PER_SIZE and self.held + nbytes <= self.limit:
                bases.append(base)
                self.held += nbytes
        return base.view(dtype).reshape(shape)

    def _evict(self, need: int) -> None:
        """Forget unused buffers (of any size) until `need` more bytes fit under the limit."""
        for size, bases in self._free.items():
            for base in list(bases):
                if self.held + need <= self.limit:
                    return
                if sys.getrefcount(base) == 3:  # the list's, this loop's and getrefcount's
                    bases.remove(base)
                    self.held -= size

    def clear(self) -> None:
        """Drop every buffer the pool holds (the arrays handed out stay valid)."""
        with self._lock:
            self._free.clear()
            self.held = 0


pool = Pool()
