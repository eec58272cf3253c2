"""Parameter servers: ``--sync ssp:S`` (stale synchronous, Ho et al. 2013) and ``--sync async``
(Dean et al. 2012, Downpour SGD).

Every rank is a worker *and* the server of one shard: a thread (server.py) that owns range r of
the flat parameter vector (``np.array_split`` bounds over the ranks - any sizes, empty shards
included). After its backward a worker pushes each server its slice of the gradient and waits
only for the answers to its own pull - the parameters of its next step, which each server sends
when the clock rule allows (clock.py): at once (async), or once the slowest worker is at most S
steps behind (ssp:S). No barrier, no collective between the first and the last step. The traffic
runs on a communicator of its own (a private split of the group), so it never matches the
messages of a collective.

    ps = ParameterServer(model.parameters(), opt, sched, staleness=2)   # client.py; collective
    for t in range(steps):
        ...forward, backward (local gradients)...
        ps.step(t)            # push, pull: the model holds the parameters of step t + 1
    ps.finish(opt)            # every rank: the servers' final parameters (and optimizer state)

Why server threads on the workers, not server ranks: every rank computes (on this 2-core machine
a server rank would take a core's share from the workers; on a cluster it idles a GPU/CPU slot),
the servers' bandwidth and memory grow with the workers (each holds 1/P of the model, as in the
co-located servers of Li et al. 2014), and a worker's push/pull volume, 2 (P-1)/P of the model
per step, equals a ring allreduce's. The cost: a server competes with its worker for the core
(it sleeps while idle) and needs MPI_THREAD_MULTIPLE (checked).

Failure: an exception in a worker or a server thread ends the job through the runtime's abort
hooks (naming the rank); a killed rank is reported by the launcher; a rank that exits while the
others wait for it (its shard, or its clock) is named by the departure notice (stall.py) to every
waiting worker, which raises - never a hang.
"""
from __future__ import annotations

import os

import numpy as np

from ... import optim, runtime
from .base import SYNC_MODES, SyncMode
from .client import ParameterServer

__all__ = ["ParameterServer", "StaleSynchronous", "Asynchronous"]


class _ParameterServerMode(SyncMode):
    """The shared part of ssp:S and async: problems, the one-rank DataParallel group, the hooks."""

    agreed_verdict = False  # a non-finite gradient is pushed as zeros and judged by its own rank

    staleness: int | None = None

    @classmethod
    def problems(cls, param: str, cfg) -> list:
        name = f"--sync {cls.flag(param)}"
        out = []
        if cfg.pp > 1 or cfg.tp > 1:
            out.append(f"{name}: the parameter servers hold the whole model; use --pp 1 --tp 1")
        if cfg.shard != "none":
            out.append(f"{name}: the servers shard the parameters and optimizer state themselves; use --shard none")
        if cfg.compression != "none":
            out.append(f"{name}: gradients are pushed uncompressed; use --compression none")
        if cfg.model == "dlrm":
            out.append(f"{name}: model dlrm holds sharded embedding tables (model parallel); use --sync sync")
        if cfg.optimizer in optim.OPTIMIZERS and optim.OPTIMIZERS[cfg.optimizer].whole_tensor_update:
            out.append(f"{name}: optimizer {cfg.optimizer} needs whole-tensor norms, the servers hold slices; "
                       "use sgd, adam or adamw")
        for flag, value in (("--checkpoint-every", cfg.checkpoint_every), ("--resume", cfg.resume),
                            ("--stop-after-steps", cfg.stop_after_steps)):
            if value:
                out.append(f"{name}: {flag} is refused: mid-run the workers are at different steps and the "
                           "servers' state is in flight, so no consistent checkpoint exists (the final "
                           "checkpoint of --checkpoint-dir is written after finish and is consistent)")
        return out

    @classmethod
    def flag(cls, param: str) -> str:
        return cls.__name__

    def dp_group(self, mesh):
        """Each rank alone: DataParallel leaves this rank's gradient local; the servers combine them."""
        me = mesh.dp_group.rank
        return runtime.split(mesh.dp_group, me, 0, [mesh.dp_group.ranks[me]])

    budget = False  # async: --steps x P pushes in total (Asynchronous)

    def start(self, run) -> None:
        total = run.cfg.steps * run.mesh.dp_group.size if self.budget else None
        self.ps = ParameterServer(run.ddp.parameters(), run.opt, run.sched, self.staleness, run.mesh.dp_group, total)
        self._last = self.ps.stats()
        # a killed rank cannot say who it was and the launcher names its pid: map pids to ranks
        pids = run.mesh.dp_group.comm.gather(os.getpid(), root=0)
        if self.ps.rank == 0:
            print(f"[disttrain] --sync {self.flag(self.param)}: a parameter-server thread on every rank, shards of "
                  f"{self.ps.offsets[-1]} parameters; rank:pid " + " ".join(f"{r}:{q}" for r, q in enumerate(pids)),
                  flush=True)

    def update(self, run, step: int) -> bool:
        finite = self.ps.step(step)
        run.opt.zero_grad()
        return finite

    def finish(self, run) -> None:
        self.ps.finish(run.opt)

    def record(self) -> dict:
        now, last = self.ps.stats(), self._last
        self._last = now
        steps = max(1, now["steps"] - last["steps"])
        new = now["applied"] - last["applied"]  # the records keep the newest RECORDS: at most those
        applied = list(self.ps.server.applied)[-new:] if new else []
        # in steps: ssp's versions are clocks; async's count pushes, P of them a step's worth
        per = 1 if self.staleness is not None else self.ps.size
        stale = [(a.applied - a.computed_on) / per for a in applied]
        return {"wait_s": (now["wait_s"] - last["wait_s"]) / steps,
                "bytes_sent_per_step": (now["bytes"] - last["bytes"]) / steps,
                "staleness_mean": float(np.mean(stale)) if stale else 0.0,
                "staleness_max": float(max(stale)) if stale else 0.0,
                # every shard applies every push: this rank's server counts the servers' global steps
                "global_step": self.ps.server.version // per}


@SYNC_MODES.register("ssp", takes_param=True)
class StaleSynchronous(_ParameterServerMode):
    """``--sync ssp:S``: parameter servers with the stale-synchronous bound S (clock.py); S = 0
    reproduces synchronous data parallelism on the global batch (server.py: updates aggregated
    per clock)."""

    @classmethod
    def problems(cls, param: str, cfg) -> list:
        if not param.isdigit():
            return [f"--sync ssp:S needs the staleness bound S, an integer >= 0 (got {('ssp:' + param)!r})"]
        return super().problems(param, cfg)

    @classmethod
    def flag(cls, param: str) -> str:
        return f"ssp:{param}"

    def __init__(self, param: str, cfg):
        super().__init__(param, cfg)
        self.staleness = int(param)


@SYNC_MODES.register("async")
class Asynchronous(_ParameterServerMode):
    """``--sync async``: parameter servers without a bound (Downpour SGD): a worker waits only for
    the answer to its own pull; each gradient is applied on arrival (server.py).

    ``--steps N`` is a global update budget: the servers apply N x P pushes in total (the gradient
    evaluations of N synchronous steps) and every worker steps until rank 0's server says the
    budget is spent, so fast workers do more of them and a straggler no longer sets the job's end
    (Dean et al. 2012). The learning-rate schedule follows the servers' count. Nothing in the
    metrics path communicates (``collective_metrics``): rank 0 logs its own interval plus the
    servers' ``global_step``; the steps every worker did are in the final record (``summary``)."""

    budget = True
    collective_metrics = False

    def more(self, run, step: int) -> bool:
        return self.ps.more

    def finish(self, run) -> None:
        super().finish(run)
        # the final answer of rank 0's server carries every worker's clock: no gather needed
        clocks = next(p.clocks for p in reversed(self.ps.pulls) if p.server == 0)
        self._summary = {"steps_per_worker": list(clocks), "pushes_applied": int(sum(clocks))}
        if self.ps.rank == 0:
            print(f"[disttrain] --sync async: {sum(clocks)} pushes applied (budget {self.ps.budget}); "
                  f"steps per worker {list(clocks)}", flush=True)

    def record(self) -> dict:
        rec = super().record()
        # the servers' rate (they apply lr / P per push), not this worker's own schedule position
        rec["lr"] = self.ps.server.opt.lr * self.ps.size
        return rec

    def summary(self) -> dict:
        return self._summary

    @classmethod
    def flag(cls, param: str) -> str:
        return "async"
