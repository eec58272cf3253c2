"""Pipeline parallelism: model stages on different ranks, micro-batches, GPipe and 1F1B schedules.

Each rank of a pipeline group holds one stage (a contiguous slice of the layers). A global batch is
cut into m micro-batches; stage s receives micro-batch i's activation from stage s-1, runs its
forward, sends the result to s+1; backward runs the other way with the activation gradients. All
micro-batches' parameter gradients accumulate before the one optimizer step, so the update is
exactly synchronous SGD on the global batch (no stale weights, unlike PipeDream's async mode).

Schedules (``SCHEDULES``, chosen by name), for p stages and m micro-batches:

- ``gpipe`` (Huang et al. 2019): all m forwards, then all m backwards. Bubble (p-1)/(m+p-1) of the
  step; every stage keeps all m micro-batches' activations alive at the peak.
- ``1f1b`` (PipeDream-flush, Narayanan et al. 2021): stage s runs p-s-1 warm-up forwards, then
  alternates one forward and one backward, then drains the remaining backwards. Same bubble, but at
  most p-s micro-batches are alive on stage s (at most p instead of m).

Activations a stage must keep for backward live inside its layers (``self._x`` ...); with several
micro-batches in flight they are *stashed* after each forward and put back before that
micro-batch's backward. The runtime measures what it stashes: ``stats["peak_live"]`` (micro-batches
alive at once) and ``stats["peak_activation_bytes"]`` per stage - its own accounting, not a formula.

Communication is point-to-point on the pipeline group's private communicator: a small shape header
then the data, sent with MPI_Isend (so two neighbours sending to each other at the same time - a
forward activation one way, a gradient the other, as 1F1B does - cannot deadlock) and received with
blocking MPI_Recv in schedule order; message order between two stages is the same on both sides
by construction of the schedules.

Stage partitioning (``partition``, ``balanced_partition``): contiguous layer ranges that minimise
the most expensive stage, from *measured* per-layer forward+backward times (the device-placement
problem: the slowest stage sets the pipeline's pace, so balancing by layer count is wrong whenever
layers differ in cost).
"""
from __future__ import annotations

import time

import numpy as np

from ..registry import Registry
from .. import mpi, stall

from ..comm import validate
from ..nn.module import Module, Parameter
from ..groups import as_group

_FWD, _BWD, _HDR = 11, 12, 8  # message tags; header: ndim + up to 7 dims


SCHEDULES = Registry("pipeline schedule")


@SCHEDULES.register("gpipe")
def _gpipe(stage: int, stages: int, m: int) -> list:
    return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]


@SCHEDULES.register("1f1b")
def _one_f_one_b(stage: int, stages: int, m: int) -> list:
    warm = min(stages - stage - 1, m)
    ops = [("F", i) for i in range(warm)]
    f, b = warm, 0
    while f < m:  # steady state: one forward, one backward
        ops += [("F", f), ("B", b)]
        f, b = f + 1, b + 1
    ops += [("B", i) for i in range(b, m)]  # cool-down
    return ops


#: schedule name -> fn(stage, stages, micro_batches) -> [("F" | "B", micro-batch index), ...]


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """The idle share of a step with equal stage times: (p - 1) / (m + p - 1)."""
    return (stages - 1) / (micro_batches + stages - 1)


class Pipeline:
    """This rank's stage of a synchronous pipeline.

    Args:
        stage: the Module with this rank's layers, or a DataParallel wrapping it (hybrid dp x pp:
            the gradient allreduce then runs once per step, overlapping the last backward).
        group: the pipeline Group (``mesh.pp_group``); group rank = stage index.
        loss_fn: the loss on the last stage (mean over its batch, e.g. SoftmaxCrossEntropy).
        schedule: "gpipe" or "1f1b".
        micro_batches: m; the global batch must divide by it.

    ``step(x, y)`` runs one global batch (x used on the first stage, y on the last; others may pass
    None) and returns the mean loss over the batch on every stage. Parameter gradients are then the
    global-batch gradients of this stage's layers; call the optimizer as usual.
    """

    def __init__(self, stage, group, loss_fn=None, schedule: str = "1f1b", micro_batches: int = 4):
        self.group = as_group(group)
        self.s, self.p = self.group.rank, self.group.size
        err = None
        if schedule not in SCHEDULES:
            err = f"unknown pipeline schedule {schedule!r}; choose one of {list(SCHEDULES)}"
        elif not isinstance(micro_batches, int) or micro_batches < 1:
            err = f"micro_batches must be a positive int, got {micro_batches!r}"
        elif self.s == self.p - 1 and loss_fn is None:
            err = "the last pipeline stage needs a loss_fn"
        validate.check(self.group.comm, "Pipeline", dict(schedule=schedule, micro_batches=micro_batches), err,
                       always=True)
        self.ddp = stage if hasattr(stage, "no_sync") else None
        self.module = stage.model if self.ddp else stage
        self.loss_fn, self.schedule, self.m = loss_fn, schedule, micro_batches
        self.ops = SCHEDULES[schedule](self.s, self.p, micro_batches)
        ps = self.module.parameters()  # received activations take the stage's dtype
        self.dtype = ps[0].data.dtype if ps else np.float32
        self.stats = {}

    @property
    def is_first(self) -> bool:
        return self.s == 0

    @property
    def is_last(self) -> bool:
        return self.s == self.p - 1

    def step(self, x=None, y=None) -> float:
        comm, m = self.group.comm, self.m
        err = None
        if self.is_first and (x is None or len(x) % m):
            err = (f"the first stage needs the batch x, and its {len(x) if x is not None else 0} samples must "
                   f"divide into {m} micro-batches")
        elif self.is_last and (y is None or len(y) % m):
            err = (f"the last stage needs the targets y, and their {len(y) if y is not None else 0} samples "
                   f"must divide into {m} micro-batches")
        validate.check(comm, "Pipeline.step", {}, err, always=True)
        xs = np.split(x, m) if self.is_first else None
        ys = np.split(y, m) if self.is_last else None
        stash, sends, losses, self._sent = {}, [], np.zeros(m), 0
        live = peak_live = bytes_live = peak_bytes = 0
        compute = 0.0
        last_b = max(i for i, (op, _) in enumerate(self.ops) if op == "B")
        t0 = time.perf_counter()
        for k, (op, i) in enumerate(self.ops):
            if op == "F":
                inp = xs[i] if self.is_first else self._recv(comm, self.s - 1, _FWD)
                t = time.perf_counter()
                out = self.module.forward(inp)
                if self.is_last:
                    losses[i] = self.loss_fn.forward(out, ys[i])
                compute += time.perf_counter() - t
                if not self.is_last:
                    sends += self._send(comm, out, self.s + 1, _FWD)
                stash[i] = _stash(self.module, self.loss_fn if self.is_last else None)
                live += 1
                bytes_live += stash[i][1]
                peak_live, peak_bytes = max(peak_live, live), max(peak_bytes, bytes_live)
            else:
                saved, nbytes = stash.pop(i)
                _restore(saved)
                dy = None if self.is_last else self._recv(comm, self.s + 1, _BWD)
                t = time.perf_counter()
                if self.is_last:
                    dy = self.loss_fn.backward()
                    dy *= dy.dtype.type(1.0 / m)  # mean over micro-batches = mean over the global batch
                if self.ddp is not None and k != last_b:
                    with self.ddp.no_sync():
                        dx = self.ddp.backward(dy)
                elif self.ddp is not None:
                    dx = self.ddp.backward(dy)  # the last one: the dp allreduce of the accumulated grads
                else:
                    dx = self.module.backward(dy)
                compute += time.perf_counter() - t
                if not self.is_first:
                    sends += self._send(comm, dx, self.s - 1, _BWD)
                live -= 1
                bytes_live -= nbytes
        MPI = mpi.MPI
        op = stall.enter("pipeline send completion", None, group=None)
        MPI.Request.Waitall(sends)
        stall.leave(op)
        loss = float(comm.bcast(losses.mean() if self.is_last else None, root=self.p - 1))
        self.stats = dict(compute_s=compute, wall_s=time.perf_counter() - t0, peak_live=peak_live,
                          peak_activation_bytes=peak_bytes,
                          sent_bytes=self._sent, ops=len(self.ops))
        return loss

    def predict(self, x=None):
        """Forward only (evaluation, no activations kept for backward): x on the first stage;
        returns the last stage's output on every stage of the group."""
        MPI = mpi.MPI
        comm = self.group.comm
        out = self.module.forward(x if self.is_first else self._recv(comm, self.s - 1, _FWD))
        if not self.is_last:
            MPI.Request.Waitall(self._send(comm, out, self.s + 1, _FWD))
        return comm.bcast(out if self.is_last else None, root=self.p - 1)

    # ------------------------------------------------------------------ point-to-point
    def _send(self, comm, a, dest: int, tag: int) -> list:
        a = np.ascontiguousarray(a)
        if a.ndim >= _HDR:
            raise ValueError(f"pipeline activations must have fewer than {_HDR} dims, got shape {a.shape}")
        hdr = np.zeros(_HDR, np.int64)
        hdr[0] = a.ndim
        hdr[1:1 + a.ndim] = a.shape
        self._sent += a.nbytes
        return [comm.Isend(hdr, dest, tag), comm.Isend(a, dest, tag)]  # a stays referenced by the request

    def _recv(self, comm, src: int, tag: int):
        # tracked: the stall inspector and flight recorder see a stage waiting for its neighbour,
        # and the wait counts as this step's exposed communication (stall.blocking_seconds)
        op = stall.enter(f"pipeline recv from stage {src}", None, group=None)
        try:
            hdr = np.empty(_HDR, np.int64)
            comm.Recv(hdr, src, tag)
            out = np.empty(tuple(hdr[1:1 + hdr[0]]), self.dtype)
            comm.Recv(out, src, tag)
        finally:
            stall.leave(op)
        op.shape, op.dtype = out.shape, out.dtype
        return out


def _stash(module, loss_fn) -> tuple:
    """This micro-batch's cached activations (every non-parameter attribute of every sub-module,
    and of the loss), and their bytes - what the stage must keep until the micro-batch's backward."""
    saved, nbytes = [], 0
    for m in [*module.modules(), *([loss_fn] if loss_fn is not None else [])]:
        state = {k: v for k, v in vars(m).items()
                 if not isinstance(v, (Parameter, Module)) and not k.startswith("__")
                 and not (isinstance(v, (list, tuple)) and v and isinstance(v[0], Module))}
        for v in state.values():
            if isinstance(v, np.ndarray):
                nbytes += v.nbytes
            elif isinstance(v, tuple):
                nbytes += sum(a.nbytes for a in v if isinstance(a, np.ndarray))
        saved.append((m, state))
    return saved, nbytes


def _restore(saved) -> None:
    for m, state in saved:
        vars(m).update(state)


# --------------------------------------------------------------------------- partitioning
def partition(costs, stages: int) -> list:
    """Contiguous ranges [(start, end), ...] of len(costs) layers over `stages` stages that minimise
    the largest stage cost (linear partition by dynamic programming, O(stages * n^2)); ties prefer
    earlier cuts. Raises ValueError if there are fewer layers than stages."""
    costs = [float(c) for c in costs]
    n = len(costs)
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if n < stages:
        raise ValueError(f"{n} layers cannot fill {stages} pipeline stages: use at most {n} stages "
                         f"or a model with at least {stages} layers")
    prefix = np.concatenate([[0.0], np.cumsum(costs)])
    inf = float("inf")
    best = np.full((stages + 1, n + 1), inf)  # best[k][j]: first j layers on k stages
    cut = np.zeros((stages + 1, n + 1), np.int64)
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):  # stage k holds layers i..j-1
                v = max(best[k - 1][i], prefix[j] - prefix[i])
                if v < best[k][j] - 1e-15:
                    best[k][j], cut[k][j] = v, i
    out, j = [], n
    for k in range(stages, 0, -1):
        out.append((int(cut[k][j]), j))
        j = int(cut[k][j])
    return out[::-1]


def measure_layer_costs(layers, x, repeats: int = 3) -> list:
    """Median forward+backward seconds of each layer in sequence on the sample batch x (the input
    of layer i is layer i-1's output). Run it on every rank or broadcast rank 0's result: stage
    boundaries must be identical everywhere."""
    costs = []
    for layer in layers:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            y = layer.forward(x)
            layer.backward(np.ones_like(y))
            times.append(time.perf_counter() - t)
        for p in layer.parameters():
            p.grad[...] = 0
        costs.append(float(np.median(times)))
        x = y
    return costs
