"""The worker side of the parameter servers (``ParameterServer``): flattens the model, starts this
rank's server thread, pushes gradients and pulls parameters, records clocks. The design - server
threads on the workers, the protocol, failure - is in ps.py's docstring and server.py's."""
from __future__ import annotations

import collections
import os
import sys
import time

import numpy as np

from ... import faults, groups, mpi, runtime, stall
from ...comm import lowlevel as L
from ...comm.p2p import blocks
from ...errors import CollectiveError
from .clock import FINAL, RECORDS, Pull
from .server import FIN, PUSH, TAG_DATA, TAG_HDR, TAG_RDATA, TAG_RHDR, ShardServer

_HERE = os.path.dirname(os.path.abspath(__file__))


def _caller() -> str:
    """file:line of the nearest caller outside this package (the training loop), for stall reports."""
    f = sys._getframe(1)
    while f is not None and os.path.dirname(os.path.abspath(f.f_code.co_filename)) == _HERE:
        f = f.f_back
    return f"{f.f_code.co_filename}:{f.f_lineno}" if f is not None else "?"


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
        budget: async only (staleness None): the total number of steps (pushes) the servers
            apply, counted by rank 0's server (server.py, "the global update budget"); a worker
            steps while ``more`` is True, so fast workers do more of them. None: every worker
            does the steps its loop does (the same number on every worker).

    Collective over `group` (set-up checks, the private communicator). Records: ``pulls`` (every
    answer received: clock.Pull), ``trace`` ((step, started, pushed) monotonic times of this
    worker), ``server.applied`` (clock.Applied: every update this rank's shard applied).

    Example:
        >>> ps = ParameterServer(model.parameters(), opt, sched, staleness=0)
        >>> for t in range(steps): train_step(...); ps.step(t)
        >>> ps.finish(opt)
        >>> ps = ParameterServer(model.parameters(), opt, sched, None, budget=steps * world)
        >>> while ps.more: train_step(...); ps.step()
        >>> ps.finish(opt)
    """

    def __init__(self, params, opt, sched, staleness: int | None, group=None, budget: int | None = None):
        self.params = list(params)
        parent = group if group is not None else groups.world()
        dtypes = sorted({str(p.data.dtype) for p in self.params})
        err = None
        if len(dtypes) > 1:
            err = f"parameter servers need one dtype for all parameters (got {dtypes})"
        elif not all(p.replicated and isinstance(p.grad, np.ndarray) for p in self.params):
            err = ("parameter servers hold replicated parameters with dense gradients (got a model-parallel shard "
                   "or a row-sparse gradient)")
        elif getattr(opt, "whole_tensor_update", False):
            err = f"{type(opt).__name__} needs whole-tensor norms; the servers hold slices: use sgd, adam or adamw"
        elif staleness is not None and staleness < 0:
            err = f"staleness must be >= 0 (got {staleness})"
        elif budget is not None and (staleness is not None or budget < 0):
            err = f"an update budget needs asynchronous servers (staleness None) and budget >= 0 (got {budget})"
        elif not groups.thread_level_ok():
            err = "parameter servers run a server thread beside the worker: MPI_THREAD_MULTIPLE was not granted"
        L.check(parent.comm, "ParameterServer", {
            "shapes": [tuple(p.data.shape) for p in self.params], "dtype": dtypes, "staleness": staleness,
            "budget": budget, "optimizer": type(opt).__name__}, err, always=True)
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
        self.server = ShardServer(self.comm, self.values[lo:hi].copy(), opt, sched, staleness, budget)
        self.budget = budget
        # may this worker do another step: its first is granted at set-up, the rest by the keeper
        self.more = budget is None or self.rank < budget
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
        if not self.more:
            raise ValueError(f"ParameterServer.step: the update budget of {self.budget} is spent (more is False)")
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
        hdrs = [np.empty(2 + self.size, np.int64) for _ in range(self.size)]
        reqs = [self.comm.Irecv(h, s, TAG_RHDR) for s, h in enumerate(hdrs)]
        reqs += [self.comm.Irecv(self.values[lo:hi], s, TAG_RDATA) for s, (lo, hi) in enumerate(self.bounds)]
        t0 = time.monotonic()
        # tracked like a collective: the stall inspector reports a long wait naming the ranks that
        # are elsewhere, and the watchdog ends the job if a rank this one waits for has left
        # the final pull on a lane of its own: under an update budget workers do different numbers of
        # pulls, and a rank that left after ITS final pull finished its part (no false alarm)
        final = step == FINAL
        op = stall.enter("ps finish" if final else "ps pull", site=_caller(), group=self.group,
                         lane="f" if final else "p")
        try:
            self._wait(sends + reqs, op)
        except BaseException as e:
            stall.leave(op, e)
            raise
        stall.leave(op)
        self.wait_s += time.monotonic() - t0
        for s, h in enumerate(hdrs):
            self.versions[s] = h[0]
            self.pulls.append(Pull(step, s, int(h[0]), h[2:]))
        if self.budget is not None and step != FINAL:
            self.more = bool(hdrs[0][1])  # rank 0's server keeps the budget
        for p, a, b in zip(self.params, self.offsets, self.offsets[1:]):
            p.data.reshape(-1)[...] = self.values[a:b]

    def _wait(self, reqs: list, op) -> None:
        """Complete `reqs`, sleeping in growing steps (ranks may outnumber cores); raise naming the
        rank if one that this worker waits for failed, or left before its `op.seq`-th pull (every
        worker pulls once per step and, on a lane of its own, once to finish, so a rank that left
        after the same pull finished its part: stall.py's notices)."""
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
                "applied": self.server.applied_total}
