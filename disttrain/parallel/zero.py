"""ZeRO sharding of DataParallel's flat buckets (Rajbhandari et al. 2020, "ZeRO: Memory
Optimizations Toward Training Trillion Parameter Models"; PyTorch FSDP, Zhao et al. 2023).

Every flat bucket of n elements is cut into P contiguous ranges with np.array_split bounds (the
first n % P ranks own one element more; a range may be empty, so P need not divide n and a
parameter smaller than P works). Rank r *owns* range r of every bucket: it keeps the averaged
gradient of that range (``gshard``), the optimizer state for it and - with shard="full" - the only
persistent copy of those parameter values (``pown``).

What a rank owns reaches the optimizer as Parameters, one per global parameter of the bucket,
whose ``.data`` / ``.grad`` are views of the owned range restricted to that parameter (possibly
empty), named with the global parameter's name and carrying
``layout=[Piece(None, global shape, box, flat=(a, b))]`` (nn/layout.py): the optimizer's state is
keyed by global names, and a checkpoint can save and reshard it from ``opt.params`` + ``opt.state``.

    mode       kept between steps on each rank                       gradient traffic per step
    optimizer  all params, all grads + owned grads, owned opt state  reduce-scatter + allgather (= 1x allreduce)
    gradients  all params, owned grads, owned opt state              reduce-scatter + allgather (1x)
    full       owned params, owned grads, owned opt state            2 allgathers + reduce-scatter (1.5x)

A synced backward *sets* the owned gradient to this step's average (accumulation over several
backward passes is what ``no_sync`` is for): so ``opt.zero_grad()`` and ``model.zero_grad()`` are
both harmless, and forgetting one cannot mix steps. ZeRO-1's ``opt.zero_grad()`` also zeroes the
model's whole gradient buckets (what was written into them after backward would enter the next
step: the job zeroes them only right after their reduce-scatter).
"""
from __future__ import annotations

import functools

import numpy as np

from .. import comm as C

from ..comm import lowlevel as L
from ..comm.registry import ALLGATHER, REDUCE_SCATTER
from ..nn.layout import Piece, shards, whole
from ..nn.module import Parameter
from .tensor import whole_tensor_norms

SHARD_MODES = ("none", "optimizer", "gradients", "full")


def freed(shape, dtype, fill) -> np.ndarray:
    """A read-only stand-in of `shape` that holds no memory: a freed parameter reads NaN (a layer
    run on it gives NaN, not silently plausible numbers); a freed gradient refuses ``+=``."""
    return np.broadcast_to(np.full((), fill, dtype), shape)


def problems(mode: str, params, dtype, compressor, algorithm: str) -> str | None:
    """Why this DataParallel cannot shard (None if it can): decided from arguments every rank has,
    and agreed at construction (DataParallel's check) so that every rank raises together."""
    if mode not in SHARD_MODES:
        return f"DataParallel: shard must be one of {list(SHARD_MODES)}, got {mode!r}"
    if mode == "none":
        return None
    if dtype not in (np.float32, np.float64):
        return f"DataParallel: shard={mode!r} needs float32 or float64 parameters, got {dtype}"
    for p in params:
        if p.layout is not None and (len(p.layout) != 1 or p.layout[0].flat is not None
                                     or p.layout[0].rows is not None or p.layout[0].key is not None):
            return (f"DataParallel: shard={mode!r} can shard a parameter that is one block of one global array; "
                    f"{p.name!r} has layout {p.layout}")
    if compressor.name != "none" and mode != "optimizer":
        # the compressors reduce whole buckets (allreduce / allgather of payloads); top-k, 1-bit and
        # PowerSGD need the full gradient of a tensor, so none of them can stand in for a reduce-scatter
        return (f"DataParallel: compression {compressor.spec!r} needs the full gradient bucket; shard={mode!r} "
                "reduce-scatters it. Use shard='optimizer' (allreduce through the compressor, then keep the "
                "owned slice) or no compression")
    return algorithm_problem(mode, compressor.name != "none", algorithm)


def algorithm_problem(mode: str, compressed: bool, algorithm: str,
                      names=("DataParallel: shard=", "algorithm")) -> str | None:
    """Why shard `mode` cannot reduce its gradients with `algorithm` (None if it can); also the main
    job's configuration check (a traceback and exit 1 from inside DataParallel before, attack7),
    which names the two settings by its flags (`names`: how the message spells them)."""
    if mode in SHARD_MODES[1:] and (mode != "optimizer" or not compressed) and REDUCE_SCATTER.problem(algorithm):
        return (f"{names[0]}{mode!r} reduce-scatters the gradients; {names[1]} must be 'auto' or one of "
                f"{REDUCE_SCATTER.names()}, got {algorithm!r}")
    return None


class Slot:
    """One bucket's sharding: the bounds, the owned range, the parameter and gradient storage."""

    __slots__ = ("counts", "displs", "lo", "hi", "pbuf", "pown", "gshard", "shards")

    def __init__(self, n: int, size: int, rank: int):
        self.counts, self.displs = L.blocks(n, size)
        self.lo, self.hi = self.displs[rank], self.displs[rank] + self.counts[rank]
        self.pbuf = None  # the bucket's whole flat parameters (always for optimizer/gradients; gathered for full)
        self.pown = self.gshard = None
        self.shards = []


class Sharder:
    """The ZeRO state of a DataParallel: one Slot per bucket, the owned shard Parameters, the
    reduce and gather jobs, and the accounting of memory."""

    def __init__(self, mode: str, buckets, group, dtype, algorithm: str = "auto"):
        self.mode, self.group, self.dtype = mode, group, dtype
        # the parameter allgathers follow an explicit choice of the gradients' algorithm ("ring",
        # "mpi"), so that one DataParallel(algorithm=...) decides the whole step's traffic
        self.gather_algorithm = algorithm if algorithm in ALLGATHER.names() else "auto"
        self.slots = []
        self.transient = self.peak_transient = 0  # bytes of gathered parameters + whole gradient buckets
        # bytes this rank sends with the ring's volumes (every block but its own; compression/base.py's
        # rule for the allreduce): updated on the communication thread only
        self.sent = {"reduce_scatter": 0, "allgather": 0}
        for b in buckets:
            s = Slot(b.size, group.size, group.rank)
            flat = np.empty(b.size, dtype)
            for p, (off, shape) in zip(b.params, b.layout):
                flat[off:off + p.data.size] = p.data.reshape(-1)
            if mode == "full":
                s.pown = flat[s.lo:s.hi].copy()  # the only persistent copy: the rest is dropped below
                for p in b.params:
                    p.data = freed(p.data.shape, dtype, np.nan)
            else:
                s.pbuf, s.pown = flat, flat[s.lo:s.hi]
                self.attach(s, b)
            s.gshard = np.zeros(s.hi - s.lo, dtype)
            s.shards = [_shard_param(p, off, s) for p, (off, _) in zip(b.params, b.layout)]
            self.slots.append(s)

    # -------------------------------------------------------------------------- storage
    def attach(self, s: Slot, b) -> None:
        """Point the model's parameters of bucket `b` at the whole flat parameters ``s.pbuf``."""
        for p, (off, shape) in zip(b.params, b.layout):
            p.data = s.pbuf[off:off + int(np.prod(shape, dtype=np.int64))].reshape(shape)

    def release_params(self, s: Slot, b) -> None:
        """Drop a gathered bucket's whole parameters (shard="full"): the model sees NaN stand-ins."""
        if s.pbuf is None:
            return
        for p in b.params:
            p.data = freed(p.data.shape, self.dtype, np.nan)
        s.pbuf = None
        self.count(-b.size)

    def count(self, elements: int) -> None:
        self.transient += elements * self.dtype.itemsize
        self.peak_transient = max(self.peak_transient, self.transient)

    # ----------------------------------------------------------------------------- jobs
    def reduce(self, b, comm, algorithm: str, compressor) -> None:
        """Average bucket `b`'s gradient over the group and set the owned slice to it (on the
        communication thread). A compressor (shard="optimizer" only) allreduces the whole bucket."""
        s = self.slots[b.index]
        if compressor.name != "none":
            compressor.reduce_(b, comm, algorithm)
            s.gshard[...] = b.buffer[s.lo:s.hi]
        else:
            s.gshard[...] = L.reduce_scatter_on(comm, b.buffer, s.counts, s.displs, "avg", algorithm)
            self.sent["reduce_scatter"] += self._ring_bytes(s, b.size, comm)
        if self.mode == "optimizer":  # consumed: the next backward accumulates from zero
            b.buffer[...] = 0

    def gather(self, b, comm) -> np.ndarray:
        """Allgather bucket `b`'s parameters from the owners (communication thread): into the
        persistent flat buffer, or a new one for shard="full" (returned, attached by the caller)."""
        s = self.slots[b.index]
        buf = s.pbuf if s.pbuf is not None else np.empty(b.size, self.dtype)
        buf[s.lo:s.hi] = s.pown
        L.allgather_on(comm, buf, s.counts, s.displs, self.gather_algorithm)
        self.sent["allgather"] += self._ring_bytes(s, b.size, comm)
        return buf

    def _ring_bytes(self, s: Slot, n: int, comm) -> int:
        return 0 if comm.Get_size() == 1 else (n - min(s.counts)) * self.dtype.itemsize

    def owned(self) -> list:
        """The shard Parameters of every bucket (one per global parameter, possibly empty)."""
        return [q for s in self.slots for q in s.shards]

    def gather_all(self, ddp, keep=None) -> None:
        """Allgather every bucket's parameters from their owners (after an optimizer step); with
        `keep`, one bucket at a time into a temporary buffer handed to ``keep(bucket, buf)``."""
        comm, validating = ddp.group.async_comm, L.validating()
        handles = []
        for b in ddp.buckets:
            fields = {"step": ddp._steps, "op": "gather parameters", "bucket": b.index, "size": b.size}

            def job(b=b, fields=fields):
                if validating:
                    L.check(comm, "DataParallel gather", fields)
                return self.gather(b, comm)
            handles.append((b, L.submit(job, "allgather", None, ddp.group)))
            if keep is not None:  # one at a time: at most one bucket's whole parameters at once
                keep(b, handles.pop()[1].wait())
        first = None
        for _, h in handles:  # every handle is waited for; the first error is raised
            try:
                h.wait()
            except Exception as e:  # noqa: BLE001
                first = first or e
        if first is not None:
            raise first


# --------------------------------------------------------------- DataParallel's sharding API
def make_optimizer(ddp, cls, options: dict):
    """DataParallel.make_optimizer."""
    # Every rank must build the same optimizer: with different classes or options the replicas
    # drift apart silently (shard="none") or one rank waits in LAMB's norm allreduce that its
    # peers never make (a hang) - agreed once here, like DataParallel's own construction check.
    L.check(ddp.group.comm, "DataParallel.make_optimizer",
            {"optimizer": f"{cls.__module__}.{cls.__qualname__}", "options": repr(sorted(options.items()))},
            always=True)
    exact = hasattr(cls, "norm_sums")  # whole-tensor norms from partial sums (LAMB)
    if ddp.shard != "none" and getattr(cls, "whole_tensor_update", False) and not exact:
        raise ValueError(f"DataParallel.make_optimizer: {cls.__name__} needs whole-tensor quantities and takes no "
                         f"partial sums (norm_sums), but shard={ddp.shard!r} gives each rank a slice; use "
                         "shard='none' or another optimizer")
    if ddp._zero is None:
        opt = cls(ddp.model.parameters(), **options)
        whole_tensor_norms(opt, ddp.model)
        return opt
    owned = ddp._zero.owned()
    opt = cls(owned + [p for p in ddp.model.parameters() if not p.replicated], **options)
    if exact:  # the owned slices' squared norms summed over the group: the whole tensors' (same order everywhere)
        opt.norm_sums = functools.partial(_norm_sums, len(owned), ddp.group)
        whole_tensor_norms(opt, ddp.model)  # then the tp blocks' over the tp group
    if ddp.shard != "full":
        opt.register_step_post_hook(lambda: ddp._zero.gather_all(ddp))
    if ddp.shard == "optimizer":
        # The model's .grad views the whole buckets here (gradients/full: read-only stand-ins), and
        # the optimizer's own zero_grad reaches only the owned slices: anything written into the
        # model's gradients after backward (a term added by hand, garbage) entered the next step's
        # average (attack5). Clear the buckets too, as zero_grad does with shard="none".
        opt.zero_grad = functools.partial(_zero_grad, opt.zero_grad, ddp.buckets)
    return opt


def _zero_grad(zero, buckets) -> None:
    """A ZeRO-1 optimizer's zero_grad: its owned slices, then the model's whole gradient buckets."""
    zero()
    for b in buckets:
        b.buffer[...] = 0


def _norm_sums(n: int, group, sq: np.ndarray) -> np.ndarray:
    """Sum the first `n` rows (the ZeRO slices, one per global parameter on every rank) over the
    group; the rest (non-replicated parameters) are this rank's own tensors."""
    out = sq.copy()
    out[:n] = C.allreduce(np.ascontiguousarray(sq[:n]), group=group)
    return out


def full_state_dict(ddp) -> dict:
    """DataParallel.full_state_dict."""
    full = ddp.shard == "full"
    out = {p.name: p.data.copy() for p in ddp.model.parameters() if not (full and p.replicated)}
    if full:
        def keep(b, buf):
            for p, (off, shape) in zip(b.params, b.layout):
                out[p.name] = buf[off:off + int(np.prod(shape, dtype=np.int64))].reshape(shape).copy()
        ddp._zero.gather_all(ddp, keep)
    return {p.name: out[p.name] for p in ddp.model.parameters()}


def memory(ddp, optimizer) -> dict:
    """DataParallel.memory."""
    z = ddp._zero
    whole_ = sum(b.size for b in ddp.buckets) * (z.dtype.itemsize if z else ddp.buckets[0].buffer.itemsize)
    if z is None:
        return {"parameters": whole_, "gradients": whole_, "optimizer": state_bytes(optimizer), "transient": 0,
                "peak_transient": 0}
    owned = sum(s.hi - s.lo for s in z.slots) * z.dtype.itemsize
    return {"parameters": owned if z.mode == "full" else whole_,
            "gradients": owned + (whole_ if z.mode == "optimizer" else 0),
            "optimizer": state_bytes(optimizer), "transient": z.transient, "peak_transient": z.peak_transient}


def parameter_shards(ddp) -> list:
    """DataParallel.parameter_shards."""
    mine = ddp._zero.owned() if ddp.shard == "full" else ddp.params
    return [sh for p in mine for sh in shards(p)] + [
        sh for p in ddp.model.parameters() if not p.replicated for sh in shards(p)]


def _shard_param(p, off: int, s: Slot) -> Parameter:
    """The owned part of parameter `p` (at `off` in its bucket) as a Parameter of views."""
    n = p.data.size
    a, e = min(max(s.lo - off, 0), n), min(max(s.hi - off, 0), n)
    a = min(a, e)
    lo, hi = off + a - s.lo, off + e - s.lo
    if e == a:
        lo = hi = 0
    if p.layout is None:
        shape, box = tuple(p.data.shape), whole(p.data.shape)
    else:  # a tensor-parallel block: ZeRO shards the block (its flattening) over the dp group
        shape, box = p.layout[0].shape, p.layout[0].box
    q = Parameter(s.pown[lo:hi], name=p.name, replicated=False, layout=[Piece(None, shape, box, flat=(a, e))])
    q.grad = s.gshard[lo:hi]
    return q


def state_bytes(optimizer) -> int:
    return 0 if optimizer is None else sum(v.nbytes for v in optimizer.state_arrays().values()
                                           if isinstance(v, np.ndarray))

