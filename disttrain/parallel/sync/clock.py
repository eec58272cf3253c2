"""Clocks of the parameter-server modes: the stale-synchronous rule and its check from records.

A worker's *clock* is the number of steps it has finished (pushed). Stale synchronous parallel
(Ho et al. 2013, "More Effective Distributed ML via a Stale Synchronous Parallel Parameter
Server", sec. 3): with staleness S, no worker starts step t before the slowest worker finished
step t - S - 1, i.e. before ``min(clocks) >= t - S``. S = 0 is bulk-synchronous; ``None`` is
asynchronous (Dean et al. 2012, Downpour SGD: no bound).

The servers apply the rule (server.py); the workers record, for every pull, the clock vector the
answering server saw (``Pull``), so that tests and users check the bound from records rather than
trusting the implementation (``lead`` / ``violations``).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

RECORDS = 100_000  # records kept: ParameterServer.pulls/.trace, ShardServer.applied (the oldest dropped)
FINAL = -1  # a pull that waits for every worker's last step (finish): the servers' final values


class Pull:
    """One answer of one server to one worker's pull (what ``ParameterServer.pulls`` records).

    Attributes:
        step: the step the worker starts with these parameters (FINAL for the final pull).
        server: the answering server's rank.
        version: the server's version of its shard (updates applied so far).
        clocks: the worker clocks that server had seen when it answered (a tuple, one per worker).
    """

    __slots__ = ("step", "server", "version", "clocks")

    def __init__(self, step: int, server: int, version: int, clocks):
        self.step, self.server, self.version, self.clocks = step, server, version, tuple(int(c) for c in clocks)

    def __repr__(self) -> str:
        return f"Pull(step={self.step}, server={self.server}, version={self.version}, clocks={self.clocks})"


class Applied(NamedTuple):
    """One gradient applied by a server: who pushed it, for which of its steps, the shard version
    it was computed on and the version it was applied to. Staleness = applied - computed_on."""

    worker: int
    clock: int
    computed_on: int
    applied: int


def may_start(step: int, clocks: np.ndarray, staleness: int | None) -> bool:
    """The SSP rule: may a worker start `step` when the workers' clocks are `clocks`?
    (``staleness`` None: asynchronous, always; FINAL: only when every worker has finished, and
    all finished the same number of steps - the caller checks that.)"""
    if step == FINAL:
        return False
    return staleness is None or int(clocks.min()) >= step - staleness


def lead(p: Pull) -> int:
    """How many steps the worker that received `p` started ahead of the slowest worker's finished
    steps: ``step - min(clocks)``. The SSP bound is ``lead <= S``."""
    return p.step - min(p.clocks)


def violations(pulls, staleness: int) -> list:
    """The pulls that broke the SSP bound (``lead > staleness``); [] when the bound held."""
    return [p for p in pulls if p.step != FINAL and lead(p) > staleness]
