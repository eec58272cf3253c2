"""Named counters of a parallel component since ``reset()``: what it moved, for benchmarks, tests
and metrics (tensor-parallel allreduces, sharded-embedding AllToAlls)."""
from __future__ import annotations


class Counters:
    """``Counters("calls", "bytes")`` has attributes ``calls`` and ``bytes``, all 0 after reset()."""

    def __init__(self, *names: str, doc: str = ""):
        self._names = names
        self.__doc__ = doc or self.__doc__
        self.reset()

    def reset(self) -> None:
        for n in self._names:
            setattr(self, n, 0)

    def add(self, **amounts) -> None:
        for n, v in amounts.items():
            setattr(self, n, getattr(self, n) + v)

    def as_dict(self) -> dict:
        return {n: getattr(self, n) for n in self._names}
