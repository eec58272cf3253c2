"""``--sync hybrid:G``: the async-sync hybrid of the book's distributed-training chapter.

The data-parallel ranks form G groups of consecutive ranks (sizes differ by at most one when G
does not divide them; at most 8 groups, as the book advises). Inside a group training is
synchronous data parallelism - DataParallel over the group, with all its features (buckets,
compression, the automatic algorithm choice). Between groups the replicas exchange every
``--hybrid-period`` steps through a pluggable exchange (``--hybrid-exchange``,
parallel/sync/exchange.py: today periodic averaging, local SGD between groups; an asynchronous
parameter-server exchange is the other member it is designed for).

``hybrid:1`` is synchronous data parallelism; ``hybrid:<dp>`` is ``local:<period>``.
"""
from __future__ import annotations

from .base import SYNC_MODES
from .local import PeriodicAveraging, _positive_int, consecutive_groups

MAX_GROUPS = 8  # the book: groups beyond ~8 no longer pay (staleness grows with their number)


@SYNC_MODES.register("hybrid", takes_param=True)
class HybridGroups(PeriodicAveraging):
    """``hybrid:G``: G synchronous groups that exchange every ``--hybrid-period`` steps."""

    def __init__(self, param: str, cfg):
        super().__init__(param, cfg)
        self.n, self.period = int(param), cfg.hybrid_period

    @classmethod
    def problems(cls, param: str, cfg) -> list:
        g, out = _positive_int(param, "hybrid:G needs G, the number of groups,")
        if g > MAX_GROUPS:
            out.append(f"sync: hybrid:{g} asks for more than {MAX_GROUPS} groups (local:H: one replica per rank)")
        if cfg.hybrid_period < 1:
            out.append(f"hybrid-period must be an integer >= 1 (got {cfg.hybrid_period})")
        out += super().problems(param, cfg)
        return out + (cls._landing(cfg.hybrid_period, cfg, "--hybrid-period") if cfg.hybrid_period >= 1 else [])

    def groups(self, dp: int) -> list:
        if self.n > dp:  # the same verdict on every rank: decided by the configuration and dp
            raise ValueError(f"--sync hybrid:{self.n} needs at least {self.n} data-parallel ranks (dp is {dp})")
        return consecutive_groups(dp, self.n)
