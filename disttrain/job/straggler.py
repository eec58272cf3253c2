"""A straggler injector for experiments: ``--straggler RANK:FACTOR`` makes one rank's compute
FACTOR times slower. After each step's computation that rank sleeps (FACTOR - 1) times the compute
time it just measured, so the slowdown follows the real cost of the step (a slower host, a
throttled GPU) rather than adding a constant. How much the others then wait is what tells the
--sync modes apart (synchronous SGD waits for the slowest rank every step; local SGD once per H).
"""
from __future__ import annotations

import time


def parse(spec: str) -> tuple:
    """(rank, factor) of "RANK:FACTOR"; ValueError saying what is accepted."""
    rank, sep, factor = spec.partition(":")
    try:
        r, f = int(rank), float(factor)
    except ValueError:
        r, f = -1, 0.0
    if not sep or r < 0 or not f >= 1 or f == float("inf"):
        raise ValueError(f"straggler must be RANK:FACTOR with RANK an integer >= 0 and FACTOR a finite number >= 1 "
                         f"(e.g. 1:3), got {spec!r}")
    return r, f


def problems(spec: str) -> list:
    """Configuration problems of --straggler ([] if none or empty)."""
    if not spec:
        return []
    try:
        parse(spec)
    except ValueError as e:
        return [str(e)]
    return []


class Straggler:
    """Slows this process's compute if it is the straggler (a no-op object on the other ranks).

    Args:
        spec: "RANK:FACTOR" or "" (none).
        rank, world: this process's world rank and the world size (RANK must be < world: a
            ValueError otherwise, the same on every rank).

    Example:
        >>> s = Straggler("1:3", dt.rank(), dt.size()); busy = compute(); s.delay(busy)
    """

    def __init__(self, spec: str, rank: int, world: int):
        self.rank, self.factor = parse(spec) if spec else (-1, 1.0)
        if self.rank >= world:
            raise ValueError(f"--straggler {spec}: rank {self.rank} does not exist (the job has {world} ranks)")
        self.active = self.rank == rank and self.factor > 1
        self.slept = 0.0

    def delay(self, compute_s: float) -> None:
        """Sleep (FACTOR - 1) x `compute_s` on the straggler rank."""
        if self.active and compute_s > 0:
            t = (self.factor - 1) * compute_s
            time.sleep(t)
            self.slept += t
