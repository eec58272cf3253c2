"""How the replicas of a model agree on its parameters: the main job's ``--sync`` modes.

Synchronous data parallelism (``sync``, the default) averages every step's gradients over the
data-parallel ranks before any rank steps its optimizer. Other modes (issue 18) relax that:
parameter servers with bounded or unbounded staleness, local SGD with periodic averaging, hybrid
groups. Each mode is one class in ``SYNC_MODES`` (the registry idiom: ``--sync NAME[:PARAM]``)
implementing the hooks below; the main job's loop calls them and nothing else differs.

    mode = make("local:4", cfg)
    group = mode.dp_group(mesh)       # DataParallel averages gradients over this group
    mode.start(run)                   # model, DataParallel and optimizer exist
    finite = mode.update(run, step)   # after this rank's backward: apply the step
    mode.finish(run)                  # before the final evaluation and checkpoint
"""
from __future__ import annotations

import numpy as np

from ... import numerics
from ...comm import api as C
from ...registry import split
from .base import SYNC_MODES, SyncMode


@SYNC_MODES.register("sync")
class Synchronous(SyncMode):
    """Synchronous data parallelism: DataParallel averaged the gradients during backward; every
    replica steps the same optimizer on the same average, so the replicas stay identical."""

    def update(self, run, step: int) -> bool:
        sharded = run.cfg.shard != "none"
        if run.model_parallel or sharded:  # different parameters (or ZeRO slices) per rank: they vote
            finite = numerics.all_finite(run.opt.params if sharded else run.model.parameters())
            finite = bool(C.allreduce(np.array([int(finite)]), op="min", algorithm="mpi")[0])
        else:  # averaged grads are identical on every replica, so this verdict is too (numerics.py)
            finite = numerics.all_finite(run.ddp.parameters())
        if finite:
            run.opt.step()
            run.ddp.compressor.commit()
        else:  # a skipped step leaves no trace in error-feedback / warm-start state either
            run.ddp.compressor.rollback()
        run.opt.zero_grad()
        return finite


def make(name: str, cfg) -> SyncMode:
    """The mode named by ``--sync`` (e.g. "sync", "local:4"); ValueError naming the choices."""
    problem = SYNC_MODES.problem(name)
    if problem:
        raise ValueError(problem)
    base, param = split(name)
    return SYNC_MODES[base](param, cfg)


def problems(name: str, cfg) -> list:
    """Every problem of ``--sync name`` under `cfg` ([] if none): the config validator's entry."""
    problem = SYNC_MODES.problem(name)
    if problem:
        return [f"sync: {problem}"]
    base, param = split(name)
    return SYNC_MODES[base].problems(param, cfg)


# the modes of their own modules register themselves (below the registry and the base class they use)
from . import ps  # noqa: E402,F401  (ssp:S, async: parameter servers)
