"""Run-time switches of the collectives layer, set from the environment or from code.

Every rank must use the same settings: e.g. validation on in one rank and off in another makes
the ranks call different numbers of MPI collectives, which hangs.

Environment variables (read by ``dt.init()``):
    DISTTRAIN_VALIDATE=0        skip the cross-rank consistency check (see validate.py for its cost)
    DISTTRAIN_VERBOSE=1         log every collective (name, algorithm, bytes, time) to stderr
    DISTTRAIN_SEGMENT_BYTES=N   pipeline segment size of ring / tree / double_tree (default 2 MiB)
    DISTTRAIN_PS_SERVERS=K      parameter-server shards for algorithm="ps" (default: every rank)
    DISTTRAIN_COSTMODEL=FILE    calibrated cost-model parameters for algorithm="auto"
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Config:
    validate: bool = True
    verbose: bool = False
    # Pipeline segment. Measured on shared memory (scripts/bench_collectives.py, README): every
    # "transfer" there is a CPU copy on the same core that reduces, so there is nothing to overlap
    # and fewer, larger segments win (ring at 16 MiB, p=2: 1.15x native with 512 KiB segments,
    # 1.27x with 2 MiB). Over a network the NIC's DMA overlaps the reduction and smaller segments
    # (256-512 KiB) pay off: set DISTTRAIN_SEGMENT_BYTES there.
    segment_bytes: int = 2 * 1024 * 1024
    ps_servers: int = 0  # 0 = every rank serves one shard
    costmodel_file: str = ""


settings = Config()


def load_from_env() -> None:
    env = os.environ
    settings.validate = env.get("DISTTRAIN_VALIDATE", "1") not in ("0", "false", "no")
    settings.verbose = env.get("DISTTRAIN_VERBOSE", "0") not in ("0", "", "false", "no")
    settings.segment_bytes = max(1024, int(env.get("DISTTRAIN_SEGMENT_BYTES", settings.segment_bytes)))
    settings.ps_servers = int(env.get("DISTTRAIN_PS_SERVERS", settings.ps_servers))
    settings.costmodel_file = env.get("DISTTRAIN_COSTMODEL", settings.costmodel_file)


def set_validation(enabled: bool) -> None:
    """Turn the cross-rank consistency check of every collective on or off (on all ranks alike).

    The check costs one 24-byte MPI_Allreduce per collective call (about one small-message
    latency: ~3-4 us between two processes on one host). Turn it off for hot loops that are known
    to be consistent, e.g. after the first training step has run with it on.
    """
    settings.validate = bool(enabled)


def set_verbose(enabled: bool) -> None:
    """Log every collective call (name, algorithm, bytes, duration) to stderr."""
    settings.verbose = bool(enabled)
