"""The units of shard="gradients" and shard="full": FSDP's flat parameter per wrapped module
(Zhao et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel").

A *unit* is a top-level child of the model that holds replicated parameters (a model with
parameters of its own, outside any child, is one unit: the model itself). Each unit is one flat
bucket. Its ``forward`` / ``backward`` are wrapped on the instance (as torch's forward pre-hooks,
not a module swap; the model's structure, names and parameters stay as they were):

- full, forward of unit i: wait for its parameters' allgather (submitted earlier as a prefetch, or
  now), submit the allgather of unit i+1 (it overlaps unit i's compute on the communication
  thread), run, free the gathered parameters (the model then reads NaN stand-ins).
- backward of unit i (reverse order): gather again (full; prefetching unit i-1), allocate the
  unit's whole gradient bucket, run, free the parameters, submit the reduce-scatter of the bucket;
  the communication thread keeps the owned slice and drops the whole bucket - so a rank holds at
  most its slices plus about two units' whole parameters and gradients.

Collectives pair up by issue order, so every rank issues the same *plan*: the forward plan
``G0 G1 ... G(K-1)`` and the backward plan ``G(K-1) G(K-2) RS(K-1) G(K-3) RS(K-2) ... RS(0)`` (no
G in "gradients", no RS under no_sync). A hook submits the plan up to the operation it needs, so a
unit that did not run still takes part, and units may run in another order (a gather runs early,
a reduce-scatter moves up: every rank runs the same model, so every rank moves it alike); a unit
whose backward runs twice in one step is an error. When
anything raises mid-step, the rest of the plan is submitted carrying the error (validation on:
every rank raises CollectiveError), then everything in flight is waited for - the same rule as
DataParallel's buckets (issue 14).
"""
from __future__ import annotations

import functools
import time

import numpy as np

from .. import stall, timeline
from ..comm import lowlevel as L
from ..groups import rank as world_rank


IN_FLIGHT = 2  # whole gradient buckets allowed to wait for their reduce-scatter at once


def top_units(model) -> list:
    """The model's units in forward order: its top-level children that hold replicated
    parameters, or [model] when the model has replicated parameters of its own."""
    own = [p for p in vars(model).values() if getattr(p, "replicated", False) and hasattr(p, "grad")]
    if own:
        return [model]
    return [m for _, m in model.children() if any(p.replicated for p in m.parameters())]


def union_and_overlap(spans, windows) -> tuple[float, float]:
    """(length of the union of the intervals `spans`, length of that union inside the disjoint
    intervals `windows`)."""
    merged = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    total = sum(b - a for a, b in merged)
    inside = sum(max(0.0, min(b, w1) - max(a, w0)) for a, b in merged for w0, w1 in windows)
    return total, inside


def blocking_overlap(spans) -> float:
    """How long the communication `spans` (perf_counter) overlapped the training thread's own
    blocking collectives (stall.blocking_windows): counted in both DataParallel's comm_seconds and
    stall.blocking_seconds, so the job's comm_s subtracts it once (job/metrics.py)."""
    if not spans:
        return 0.0
    return union_and_overlap(spans, stall.blocking_windows(min(a for a, _ in spans)))[1]


class Units:
    """Drives the gathers and reduce-scatters of the units of a sharded DataParallel."""

    def __init__(self, ddp, units: list):
        self.ddp, self.units = ddp, units
        self.gathers = ddp.shard == "full"
        k = len(units)
        self.bucket = [ddp.buckets[k - 1 - i] for i in range(k)]  # unit i's bucket: backward order
        self.plan, self.pos, self.phase = [], 0, None
        self.handles = {}  # op -> Handle, until consumed or drained
        self.spans, self.windows = [], []
        for i, m in enumerate(units):
            if self.gathers:
                m.forward = functools.partial(self._forward, i, m.forward)
            m.backward = functools.partial(self._backward, i, m.backward)

    # ------------------------------------------------------------------------------ plans
    def _forward_plan(self) -> list:
        return [("G", i) for i in range(len(self.units))] if self.gathers else []

    def _backward_plan(self, sync: bool) -> list:
        order, out = list(range(len(self.units) - 1, -1, -1)), []
        if self.gathers:
            out.append(("G", order[0]))
        for j, i in enumerate(order):
            if self.gathers and j + 1 < len(order):
                out.append(("G", order[j + 1]))
            if sync:
                out.append(("RS", i))
        return out

    def start(self, phase: str) -> None:
        """Begin a forward or backward plan (whatever the previous one left is drained first)."""
        if self.phase is not None:
            self.finish(release_grads=False)
        self.phase, self.pos = phase, 0
        self.plan = self._forward_plan() if phase == "forward" else self._backward_plan(self.ddp._sync)

    # --------------------------------------------------------------------------- wrappers
    def _forward(self, i, fn, x):
        if self.phase != "forward" or (("G", i) not in self.handles and ("G", i) not in self.plan[self.pos:]):
            self.start("forward")  # a new forward (unit i's gather is neither prefetched nor still to come)
        try:
            self._need(i)
            y = fn(x)
        except BaseException as e:
            self.fail(f"rank {world_rank()}: unit {i}'s forward raised {type(e).__name__}: {e}",
                      then_backward=self.ddp.model.training)
            raise
        self._free(i)
        return y

    def _backward(self, i, fn, dy):
        ddp = self.ddp
        if self.phase != "backward":
            if ddp._sync and not ddp._in_backward:
                raise RuntimeError(ddp._direct_backward_message(self.units[i].parameters()))
            self.start("backward")
        try:
            self._need(i)
            self._grads(i)
            dx = fn(dy)
            self._free(i)
            if ddp._sync:
                self._through(("RS", i))
        except BaseException as e:
            if not ddp._in_backward:  # ddp.backward fails the step itself
                self.fail(f"rank {world_rank()}: unit {i}'s backward raised {type(e).__name__}: {e}")
            raise
        return dx

    # ------------------------------------------------------------------------- operations
    def _through(self, op) -> None:
        """Submit the plan up to and including `op`."""
        if op not in self.plan[self.pos:]:
            raise RuntimeError(
                f"DataParallel(shard={self.ddp.shard!r}): unit {op[1]} ({type(self.units[op[1]]).__name__}) ran "
                f"twice in one {self.phase}; sharded units must each run once per forward and once per "
                f"backward (ranks pair their collectives by a plan of one gather and one reduce-scatter per unit)")
        if op[0] == "RS":  # a reduce-scatter goes now, not after those of units whose backward has not run
            self.plan.insert(self.pos, self.plan.pop(self.plan.index(op, self.pos)))
        while True:
            nxt = self.plan[self.pos]
            self.pos += 1
            self._submit(nxt)
            if nxt == op:
                return

    def _need(self, i: int) -> None:
        """Unit i's whole parameters, attached to the model (full); then prefetch the next gather."""
        if not self.gathers:
            return
        z, b = self.ddp._zero, self.bucket[i]
        s = z.slots[b.index]
        if ("G", i) not in self.handles:
            self._through(("G", i))
        self._wait(self.handles.pop(("G", i)))
        z.attach(s, b)
        if self.pos < len(self.plan) and self.plan[self.pos][0] == "G":
            self._through(self.plan[self.pos])

    def _free(self, i: int) -> None:
        if self.gathers:
            b = self.bucket[i]
            self.ddp._zero.release_params(self.ddp._zero.slots[b.index], b)

    def _grads(self, i: int) -> None:
        """Unit i's whole gradient bucket, allocated when its backward first needs it."""
        b = self.bucket[i]
        if b.buffer is None:
            self._limit_in_flight()
            b.buffer = np.zeros(b.size, self.ddp._zero.dtype)
            self.ddp._attach_grads(b)
            self._account()

    def _limit_in_flight(self) -> None:
        """FSDP's rate limiter: while IN_FLIGHT whole gradient buckets still wait for their
        reduce-scatter, wait for the oldest before allocating another - backward would otherwise
        outrun the communication and hold many units' whole gradients at once."""
        pending = [h for op, h in self.handles.items() if op[0] == "RS" and not h.test()]
        for h in pending[:max(0, len(pending) - IN_FLIGHT + 1)]:
            try:
                self._wait(h)
            except Exception:  # noqa: BLE001 - raised when the step drains its handles
                pass

    def _account(self) -> None:
        z = self.ddp._zero
        z.transient = sum(b.size for b in self.bucket if b.buffer is not None) * z.dtype.itemsize + sum(
            b.size for b, s in zip(self.ddp.buckets, z.slots) if self.gathers and s.pbuf is not None) * z.dtype.itemsize
        z.peak_transient = max(z.peak_transient, z.transient)

    def _submit(self, op, error: str | None = None) -> None:
        ddp, z = self.ddp, self.ddp._zero
        kind, i = op
        b = self.bucket[i]
        s = z.slots[b.index]
        validating = L.validating()
        if error is not None and not validating:
            ddp._late_error = ddp._late_error or error  # raised after the step, whose collectives go on
            error = None
        comm, fields = ddp.group.async_comm, {"step": ddp._steps, "optimizer_steps": ddp._optimizer_steps(),
                                               "phase": self.phase, "op": kind, "unit": i,
                                               "bucket": b.index, "key": b.key, "size": b.size}
        if kind == "G":
            if s.pbuf is None:
                s.pbuf = np.empty(b.size, z.dtype)  # allocated here, on the caller's thread: accounted
                self._account()

            def job():
                if validating:
                    L.check(comm, "DataParallel gather", fields, error)
                return z.gather(b, comm)
        else:
            self._grads(i)  # a unit that ran no backward contributes zeros, as on every rank
            fields["training_forwards_without_backward (evaluate with model.eval())"] = ddp._forwards - ddp._backwards

            def job():
                if validating:
                    L.check(comm, "DataParallel bucket", fields, error)
                z.reduce(b, comm, ddp.algorithm, ddp.compressor)
                ddp._release_grads(b)  # the owned slice is kept; the whole bucket goes now
        timeline.instant(f"unit {i} {kind}", "bucket", bytes=b.size * z.dtype.itemsize)
        self.handles[op] = L.submit(job, "allgather" if kind == "G" else "reduce_scatter", None, ddp.group)

    def _wait(self, h):
        t = time.perf_counter()
        try:
            return h.wait()
        finally:
            self.windows.append((t, time.perf_counter()))
            self.spans.append((h.t_start, h.t_end))

    # ------------------------------------------------------------------------ step ends
    def run_backward(self, dy):
        """DataParallel.backward for these modes: the model's backward inside a backward plan."""
        ddp = self.ddp
        ddp._in_backward = True
        ddp._backwards += 1
        self.start("backward")
        try:
            dx = ddp.model.backward(dy)
        except BaseException as e:
            ddp._in_backward = False
            self.fail(f"rank {world_rank()}: the model's backward raised {type(e).__name__}: {e}")
            ddp._steps += 1
            ddp._forwards = ddp._backwards = 0
            self.take_times()
            raise
        ddp._in_backward = False
        self.end_step()
        return dx

    def end_step(self) -> None:
        """Finish the plan, account the step's communication, count the step (synced)."""
        ddp = self.ddp
        try:
            self.finish(release_grads=ddp._sync)
        finally:
            comm, exposed, handoff, both = self.take_times()
            ddp.comm_seconds += comm
            ddp.blocking_overlap_seconds += both
            ddp.exposed_comm_seconds += exposed
            ddp.handoff_seconds += handoff
            if ddp._sync:
                ddp._steps += 1
                ddp._forwards = ddp._backwards = 0
        late, ddp._late_error = ddp._late_error, None
        if late is not None:
            raise RuntimeError(late)

    def finish(self, release_grads: bool) -> None:
        """Submit the rest of the plan, wait for everything, free gathered parameters (and, when
        the step synced, the whole gradient buckets); raise the first error."""
        first = None
        try:
            rest, self.pos = self.plan[self.pos:], len(self.plan)
            for op in rest:  # in plan order, as every rank
                self._submit(op)
        except Exception as e:  # noqa: BLE001
            first = e
        first = self._drain() or first
        if release_grads:
            for b in self.bucket:
                self.ddp._release_grads(b)
        self._account()
        if first is not None:
            raise first

    def fail(self, why: str, then_backward: bool = False) -> None:
        """Submit the rest of the plan carrying `why`, wait for everything, free everything.

        A training forward that fails also submits the backward plan (`then_backward`): a peer
        whose forward finished (the failure was in the last unit) is in its backward next, and a
        peer whose forward failed on the error does the same - every rank issues both plans."""
        rest, self.pos = self.plan[self.pos:], len(self.plan)
        for op in rest:
            self._submit(op, error=why)
        if then_backward and self.phase == "forward":
            self.phase = "backward"
            for op in self._backward_plan(self.ddp._sync):
                self._submit(op, error=why)
            self.ddp._steps += self.ddp._sync  # the step is over on every rank, as after a failed backward
            self.ddp._forwards = self.ddp._backwards = 0
        self._drain()
        if self.ddp._sync:
            for b in self.bucket:
                self.ddp._release_grads(b)
        self._account()

    def _drain(self):
        first = None
        for op, h in list(self.handles.items()):
            try:
                self._wait(h)
            except Exception as e:  # noqa: BLE001 - every handle is waited for; the first error is raised
                first = first or e
        self.handles.clear()
        for i in range(len(self.units)):
            self._free(i)
        self.phase, self.plan, self.pos = None, [], 0
        return first

    def take_times(self) -> tuple[float, float, float, float]:
        """(comm, exposed, handoff, overlap with blocking collectives) seconds since the last call."""
        comm, exposed = union_and_overlap(self.spans, self.windows)
        waited = sum(b - a for a, b in self.windows)
        both = blocking_overlap(self.spans)
        self.spans, self.windows = [], []
        return comm, exposed, max(0.0, waited - exposed), both
