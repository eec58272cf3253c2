"""disttrain's log: the standard ``logging`` logger "disttrain", rank-prefixed, rank 0 by default.

    DISTTRAIN_LOG_LEVEL=DEBUG|INFO|WARNING|ERROR   (default INFO)
    DISTTRAIN_LOG_RANKS=all                         (default: only rank 0 logs; every rank logs errors)

Records look like ``[disttrain r0] WARNING: ...``. Applications configure the "disttrain" logger
like any other (handlers, levels); the handler below is added only if it has none. Fatal
diagnostics (aborts, stall reports, flight-record paths) and the main job's progress lines are
written directly, on the ranks they concern, whatever the level.
"""
from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("disttrain")


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, all_ranks: bool):
        super().__init__()
        self.rank, self.all_ranks = rank, all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return self.all_ranks or self.rank == 0 or record.levelno >= logging.ERROR


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record (test capture, redirection)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def setup(rank: int) -> None:
    """Configure the logger for this rank (dt.init calls it; idempotent)."""
    if logger.handlers:
        for f in logger.filters:
            if isinstance(f, _RankFilter):
                f.rank = rank
        return
    level = os.environ.get("DISTTRAIN_LOG_LEVEL", "INFO").upper()
    logger.setLevel(getattr(logging, level, logging.INFO))
    h = _Stderr()
    h.setFormatter(logging.Formatter("[disttrain r%(rank)s] %(levelname)s: %(message)s"))
    logger.addHandler(h)
    logger.addFilter(_RankFilter(rank, os.environ.get("DISTTRAIN_LOG_RANKS", "") == "all"))
    logger.propagate = False
