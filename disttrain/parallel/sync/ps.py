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

    ps = ParameterServer(model.parameters(), opt, sched, staleness=2)   # collective
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

import collections
import os
import time

import numpy as np

from ... import faults, groups, mpi, optim, runtime, stall
from ...comm import lowlevel as L
from ...comm.p2p import blocks
from ...errors import CollectiveError
from .base import SYNC_MODES, SyncMode
from .clock import FINAL, Pull
from .server import FIN, PUSH, TAG_DATA, TAG_HDR, TAG_RDATA, TAG_RHDR, ShardServer

RECORDS = 100_000  # pulls kept in ParameterServer.pulls, steps in .trace (the oldest are dropped)


class ParameterServer:
    """This rank's worker side of the parameter servers, and its server thread.

    Args:
        params: the model's parameters (the same shapes and dtype on every rank, replicated and
            equal - broadcast them first); their ``.grad`` is this rank's gradient, already
            weighted so that the mean over the ranks is the global-batch gradient.
        opt: an optimizer over `params` whose class and options the servers use (element-wise
            update rules only: LAMB's whole-tensor norms are refused). It is never stepped; its
            state becomes the servers' at ``finish(opt)``.
        sched: the learning-rate schedule (``optim.Schedule``) the servers follow per step.
        staleness: S (ssp:S), or None (async).
        group: the ranks that are workers and servers (default: the world).

    Collective over `group` (set-up checks, the private communicator). Records: ``pulls`` (every
    answer received: clock.Pull), ``trace`` ((step, started, pushed) monotonic times of this
    worker), ``server.applied`` (clock.Applied: every update this rank's shard applied).

    Example:
        >>> ps = ParameterServer(model.parameters(), opt, sched, staleness=0)
        >>> for t in range(steps): train_step(...); ps.step(t)
        >>> ps.finish(opt)
    """

    def __init__(self, params, opt, sched, staleness: int | None, group=None):
        self.params = list(params)
        parent = group if group is not None else groups.world()
        dtypes = sorted({str(p.data.dtype) for p in self.params})
        err = None
        if len(dtypes) > 1:
            err = f"parameter servers need one dtype for all parameters (got {dtypes})"
        elif getattr(opt, "whole_tensor_update", False):
            err = f"{type(opt).__name__} needs whole-tensor norms; the servers hold slices: use sgd, adam or adamw"
        elif staleness is not None and staleness < 0:
            err = f"staleness must be >= 0 (got {staleness})"
        elif not groups.thread_level_ok():
            err = "parameter servers run a server thread beside the worker: MPI_THREAD_MULTIPLE was not granted"
        L.check(parent.comm, "ParameterServer", {
            "shapes": [tuple(p.data.shape) for p in self.params], "dtype": dtypes, "staleness": staleness,
            "optimizer": type(opt).__name__}, err, always=True)
        self.staleness = staleness
        # a private communicator: pushes and pulls never match a collective's messages
        self.group = runtime.split(parent, 0, parent.rank, parent.ranks)
        self.comm, self.rank, self.size = self.group.comm, self.group.rank, self.group.size
        sizes = [p.data.size for p in self.params]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
        n = self.offsets[-1]
        counts, displs = blocks(n, self.size)
        self.bounds = [(d, d + c) for c, d in zip(counts, displs)]
        dtype = np.dtype(dtypes[0]) if dtypes else np.dtype(np.float64)
        self.grads, self.values = np.empty(n, dtype), np.empty(n, dtype)
        self._gather(self.values, "data")
        lo, hi = self.bounds[self.rank]
        self.server = ShardServer(self.comm, self.values[lo:hi].copy(), opt, sched, staleness)
        self.server.start()
        self.clock = 0
        self.versions = np.zeros(self.size, np.int64)  # the shard version each server last sent here
        self.pulls = collections.deque(maxlen=RECORDS)
        self.trace = collections.deque(maxlen=RECORDS)
        self.wait_s = 0.0  # seconds this worker waited for answers
        self.bytes_sent = 0  # payload bytes this worker pushed to other ranks
        self._started = time.monotonic()
        self._finished = False

    def _gather(self, flat: np.ndarray, what: str) -> None:
        for p, a, b in zip(self.params, self.offsets, self.offsets[1:]):
            flat[a:b] = getattr(p, what).reshape(-1)

    def step(self, t: int | None = None) -> bool:
        """Push this rank's gradient of step `t` (its ``clock``) and pull the parameters of the
        next step into the model; returns whether the gradient was finite (a non-finite one is
        pushed as zeros: the clocks move on, the update loses this rank's share)."""
        if t is not None and t != self.clock:
            raise ValueError(f"ParameterServer.step({t}): this worker is at step {self.clock}")
        self._gather(self.grads, "grad")
        finite = bool(np.isfinite(self.grads).all())
        if not finite:
            self.grads[...] = 0
        pushed = time.monotonic()
        faults.point("ps-push")  # tests: a worker dies before it pushes
        sends = []
        for s, (lo, hi) in enumerate(self.bounds):
            hdr = np.array([PUSH, self.clock, self.versions[s]], np.int64)
            sends += [self.comm.Isend(hdr, s, TAG_HDR), self.comm.Isend(self.grads[lo:hi], s, TAG_DATA)]
            if s != self.rank:
                self.bytes_sent += self.grads[lo:hi].nbytes
        self.clock += 1
        self._pull(self.clock, sends)
        self.trace.append((self.clock - 1, self._started, pushed))
        self._started = time.monotonic()
        return finite

    def _pull(self, step: int, sends: list) -> None:
        """Receive every server's answer for `step` into the model (the wait is this rank's only one)."""
        hdrs = [np.empty(1 + self.size, np.int64) for _ in range(self.size)]
        reqs = [self.comm.Irecv(h, s, TAG_RHDR) for s, h in enumerate(hdrs)]
        reqs += [self.comm.Irecv(self.values[lo:hi], s, TAG_RDATA) for s, (lo, hi) in enumerate(self.bounds)]
        t0 = time.monotonic()
        # tracked like a collective: the stall inspector reports a long wait naming the ranks that
        # are elsewhere, and the watchdog ends the job if a rank this one waits for has left
        op = stall.enter("ps pull" if step != FINAL else "ps finish", group=self.group, lane="p")
        try:
            self._wait(sends + reqs, op)
        except BaseException as e:
            stall.leave(op, e)
            raise
        stall.leave(op)
        self.wait_s += time.monotonic() - t0
        for s, h in enumerate(hdrs):
            self.versions[s] = h[0]
            self.pulls.append(Pull(step, s, int(h[0]), h[1:]))
        for p, a, b in zip(self.params, self.offsets, self.offsets[1:]):
            p.data.reshape(-1)[...] = self.values[a:b]

    def _wait(self, reqs: list, op) -> None:
        """Complete `reqs`, sleeping in growing steps (ranks may outnumber cores); raise naming the
        rank if one that this worker waits for failed, or left before its `op.seq`-th pull (every
        worker pulls once per step and once to finish, so a rank that left after the same pull
        finished its part: stall.py's notices)."""
        MPI, seen, delay = mpi.MPI, -1, 0.0
        while not MPI.Request.Testall(reqs):
            if stall.alarm != seen:
                seen = stall.alarm
                why = stall.peers_problem(self.group.ranks, op.gkey, op.seq)
                if why:
                    raise CollectiveError(f"rank {self.rank}: {op.name}: {why}")
            delay = min(1e-3, delay * 2 if delay else 1e-5)
            time.sleep(delay)

    def finish(self, opt=None) -> None:
        """Collective: tell every server this worker is done, receive the servers' final values
        (after every worker's last step: the same on every rank), stop the server thread, free the
        communicator. With `opt`, its state and step count become the servers' (for checkpoints)."""
        if self._finished:
            return
        self._finished = True
        sends = [self.comm.Isend(np.array([FIN, self.clock, 0], np.int64), s, TAG_HDR) for s in range(self.size)]
        self._pull(FINAL, sends)
        self.server.join()
        if opt is not None:
            self._gather_state(opt)
        self.group.free()

    def _gather_state(self, opt) -> None:
        """The servers' optimizer state, gathered into `opt` (per parameter, as if it had stepped)."""
        state, steps = self.server.state()
        counts = [hi - lo for lo, hi in self.bounds]
        opt.state = {}
        for key in sorted(state):  # the same keys on every server: one class, the same number of steps
            full = np.empty(self.offsets[-1], state[key].dtype)
            self.comm.Allgatherv(np.ascontiguousarray(state[key]), [full, counts])
            for p, a, b in zip(self.params, self.offsets, self.offsets[1:]):
                opt.state.setdefault(p.name, {})[key] = full[a:b].reshape(p.data.shape).copy()
        opt.steps = steps

    def stats(self) -> dict:
        """Cumulative counters: this worker's wait and pushed bytes, its server's answer bytes and
        applied updates (the mode's record() takes differences)."""
        return {"wait_s": self.wait_s, "bytes": self.bytes_sent + self.server.bytes_sent, "steps": self.clock,
                "applied": len(self.server.applied)}


class _ParameterServerMode(SyncMode):
    """The shared part of ssp:S and async: problems, the one-rank DataParallel group, the hooks."""

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

    def start(self, run) -> None:
        self.ps = ParameterServer(run.ddp.parameters(), run.opt, run.sched, self.staleness, run.mesh.dp_group)
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
        applied = self.ps.server.applied[last["applied"]:now["applied"]]
        # in steps: ssp's versions are clocks; async's count pushes, P of them a step's worth
        per = 1 if self.staleness is not None else self.ps.size
        stale = [(a.applied - a.computed_on) / per for a in applied]
        return {"wait_s": (now["wait_s"] - last["wait_s"]) / steps,
                "bytes_sent_per_step": (now["bytes"] - last["bytes"]) / steps,
                "staleness_mean": float(np.mean(stale)) if stale else 0.0,
                "staleness_max": float(max(stale)) if stale else 0.0}


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
    the answer to its own pull; each gradient is applied on arrival (server.py)."""

    @classmethod
    def flag(cls, param: str) -> str:
        return "async"
