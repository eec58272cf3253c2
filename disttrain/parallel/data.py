"""Data parallelism with gradient buckets whose allreduce overlaps the backward pass.

The design of PyTorch DDP (Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data
Parallel Training") and Horovod's tensor fusion, on disttrain's collectives:

- Parameters are grouped into buckets in *reverse* registration order - the order backward
  produces their gradients - with a small first bucket (1 MiB, at most half the model) so that
  communication starts early, even for a small model.
- Each parameter's ``.grad`` becomes a view into its bucket's flat buffer: no copy before or after
  the allreduce, and the bucket is one large message (cheap per byte, see the benchmarks).
- Containers report a child's gradients ready the moment its backward returns (Module hook); when
  every gradient of a bucket is ready its ``allreduce_async_(op="avg")`` starts on the
  communication thread while backward continues with earlier layers in numba/BLAS code that has
  released the GIL. ``backward`` returns once every bucket is reduced: each ``.grad`` then holds
  the average over ranks, exactly the global-batch gradient when the local batches are equal.
- On one node (``algorithm="auto"``, no compression, no sharding) the buckets live in a shared
  window and each rank averages its slice of every rank's bucket in place: nothing is copied
  (parallel/shared_buckets.py). The last bucket runs on the calling thread when the communication
  thread is idle (``backward`` waits for it at once: no hand-off); on a host without a spare core
  per rank every shared bucket does, after backward (the thread would only time-slice with the GEMMs).
- With ``compression=`` every bucket goes through a compressor instead (disttrain.compression):
  compression, the collective that fits its payload and decompression all run on the
  communication thread, so they overlap backward just like the plain allreduce. A bucket's
  stable name ("b<i>:<first param>..<last param>") keys the compressor's state (error feedback,
  warm start), and the bucket's parameter layout lets compressors work per tensor.
- With ``shard=`` the buckets are ZeRO-sharded over the ranks (Rajbhandari et al. 2020): see
  parallel/zero.py (who owns what, the optimizer over the owned slices) and parallel/units.py (the
  per-unit gathers and reduce-scatters of shard="gradients" / "full").
"""
from __future__ import annotations

import contextlib
import functools
import time

import numpy as np

from .. import comm as C
from .. import compression as Z
from ..compression import kernels as compression_kernels
from .. import timeline
from ..comm import kernels as comm_kernels
from ..comm import lowlevel as L
from ..nn.module import Module
from ..groups import as_group
from ..groups import rank as world_rank
from . import shared_buckets as SB
from . import zero as ZR
from .units import Units, blocking_overlap, top_units, union_and_overlap

FIRST_BUCKET_BYTES = 1 << 20


class _Bucket(Z.Bucket):
    """DataParallel's bucket: the public Bucket handed to the communication hook, plus what the
    step needs (parameters still pending, the in-flight handle, the .grad views handed out)."""

    __slots__ = ("pending", "handle", "views", "size")

    def __init__(self, params, dtype, index):
        self.size = sum(p.data.size for p in params)  # the buffer's length, also while it is freed (shard modes)
        super().__init__(np.zeros(self.size, dtype),
                         f"b{index}:{params[0].name}..{params[-1].name}",  # stable across runs: state key
                         [], index, params)
        self.pending, self.handle = set(), None
        self.views = []  # each parameter's .grad as handed out: a layer must accumulate into it


class DataParallel:
    """Synchronous data parallelism over a group (default: all ranks).

    Args:
        model: a Module; its containers' backward must report ready children (Sequential does).
        bucket_mb: target bucket size in MiB (the first bucket is at most 1 MiB and half the model).
        compression: None or "none" (exact), a name from ``disttrain.compression.names()``
            ("fp16", "bf16", "topk:0.01", "onebit", "powersgd:2") or a Compressor instance.
        algorithm: the allreduce algorithm for the buckets ("auto" asks the cost model).
        overlap: start each bucket's allreduce during backward (True) or all after it (False).
            Shared-memory buckets on a host without a spare core per rank (fewer cores than twice
            its ranks) are averaged after backward on the calling thread even with True: there the
            communication thread would only time-slice with the GEMMs (ARCHITECTURE sec. 11).
        group: a Group from ``dt.new_group`` (default: the world).
        shard: "none" (every rank holds everything), "optimizer" (ZeRO-1: each rank updates and keeps
            optimizer state for a 1/P slice of every bucket), "gradients" (ZeRO-2: also keeps only
            its slice of the averaged gradients) or "full" (ZeRO-3 / FSDP: also of the parameters,
            gathered per unit for its forward and backward). Sharded modes broadcast the parameters
            from the group's rank 0 at construction, need float32/float64 parameters, and take their
            optimizer from ``make_optimizer``; after ``backward`` the averaged gradients are in the
            optimizer's parameters (``opt.params``), not in the model's. "gradients" and "full" use
            one bucket per unit (parallel/units.py), not ``bucket_mb``. See docs/ARCHITECTURE.md.

    Example:
        >>> ddp = dt.DataParallel(model)
        >>> logits = ddp.forward(x); loss = loss_fn.forward(logits, y)
        >>> ddp.backward(loss_fn.backward())   # grads are now averaged over ranks
        >>> opt.step(); opt.zero_grad()
        >>> ddp = dt.DataParallel(model, shard="full"); opt = ddp.make_optimizer(optim.Adam, lr=1e-3)
    """

    def __init__(self, model: Module, bucket_mb: float = 25, compression=None, algorithm: str = "auto",
                 overlap: bool = True, group=None, shard: str = "none"):
        self.compressor = Z.make(compression)
        problem = self.compressor.check_algorithm(algorithm)
        if problem:
            raise ValueError(f"DataParallel: {problem}")
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be positive, got {bucket_mb}")
        self.model, self.algorithm, self.overlap, self.shard = model, algorithm, overlap, shard
        self.group = as_group(group)
        # Shards of model-parallel layers (Parameter.replicated False) complete their own gradients.
        self.params = [p for p in model.parameters() if p.replicated]
        if not self.params:
            raise ValueError("DataParallel: the model has no (replicated) parameters")
        dtypes = {p.data.dtype for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(f"DataParallel: parameters must share one dtype, got {sorted(map(str, dtypes))}")
        dtype = dtypes.pop()
        if self.compressor.name != "none" and dtype not in (np.float32, np.float64):
            raise ValueError(f"DataParallel: compression {self.compressor.spec!r} needs float32 or float64 "
                             f"parameters, got {dtype}")
        # a bad shard request is agreed below, so that every rank raises it (not a local ValueError)
        problem = ZR.problems(shard, self.params, dtype, self.compressor, algorithm) if isinstance(shard, str) else (
            f"DataParallel: shard must be one of {list(ZR.SHARD_MODES)}, got {shard!r}")
        units = top_units(model) if shard in ("gradients", "full") else []
        if any(isinstance(vars(u).get("backward"), functools.partial) for u in units):
            problem = problem or ("DataParallel: this model's units are already driven by another sharded "
                                  "DataParallel; build a new model (or keep using that DataParallel)")
        if units:  # one bucket per unit, in backward order (FSDP's flat parameter per wrapped module)
            groups = [[p for p in reversed(u.parameters()) if p.replicated] for u in reversed(units)]
        else:
            groups = self._size_groups(bucket_mb * (1 << 20))
        self.buckets = self._make_buckets(groups, dtype)
        comm_kernels.warmup()  # load the compiled kernels now (~0.1 s from numba's cache), not in step 1
        if self.compressor.name != "none":
            compression_kernels.warmup()
        # Every rank must bucket and compress alike, or the collectives would pair wrong messages:
        # one check at construction turns a mismatch into an error on every rank, not a hang.
        L.check(self.group.comm, "DataParallel", {
            "compression": self.compressor.spec, "algorithm": algorithm, "shard": str(shard),
            "dtype": str(dtype), "buckets": tuple((b.key, b.size) for b in self.buckets)}, problem, always=True)
        self._zero = self._units = self._optimizer = self._shared = None
        if SB.wanted(self.group, shard, self.compressor, algorithm, dtype):  # from agreed values only
            SB.warmup()
            self._shared = SB.SharedBuckets(self.group, self.buckets)  # collective: the window
            for b in self.buckets:
                self._attach_grads(b)
        if shard != "none":  # every rank shards the same values: rank 0's
            broadcast_parameters(self.params, root=0, group=self.group)
            self._zero = ZR.Sharder(shard, self.buckets, self.group, dtype, algorithm)
        if units:
            for b in self.buckets:
                self._release_grads(b)
            self._units = Units(self, units)
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._sync, self._next = True, 0  # _next: the first bucket not launched yet
        # Step fingerprint, checked with every bucket (validation on): the number of synchronised
        # steps, and the training-mode forward passes not matched by a backward since the last one
        # - a rank that skipped a backward after its forward disagrees here and every rank raises
        # CollectiveError, instead of averaging one step's gradients with another's and hanging
        # at the end. (Evaluate with model.eval(), or through the model, not ddp.forward.)
        self._steps, self._forwards, self._backwards = 0, 0, 0
        self._in_backward = False
        self._late_error = None  # a local problem found with validation off: raised after the step
        # One clock (time.perf_counter) for both threads, per step: comm = the union of the intervals
        # in which a bucket's collective ran on the communication thread; exposed = the part of that
        # union during which backward's caller was waiting for it (so 0 <= exposed <= comm); handoff
        # = the rest of the wait, when no collective ran (queueing, waking the thread, finishing).
        self.comm_seconds = 0.0
        self.exposed_comm_seconds = 0.0
        self.handoff_seconds = 0.0
        self.blocking_overlap_seconds = 0.0  # comm_seconds during the caller's blocking collectives
        for m in model.modules():  # containers call the hook as each child's backward returns
            m._grad_hook = self._on_ready

    # --------------------------------------------------------------------------- buckets
    def _size_groups(self, cap: float) -> list:
        """The parameters in backward order, cut into buckets of about `cap` bytes. The first is
        at most FIRST_BUCKET_BYTES and at most half the model, so that even a small model has a
        second bucket whose backward its first bucket's allreduce can overlap (issue 16)."""
        total = sum(p.data.nbytes for p in self.params)
        buckets, cur, size, limit = [], [], 0, min(cap, FIRST_BUCKET_BYTES, max(1, total // 2))
        for p in reversed(self.params):  # backward order
            cur.append(p)
            size += p.data.nbytes
            if size >= limit:
                buckets.append(cur)
                cur, size, limit = [], 0, cap
        if cur:
            buckets.append(cur)
        return buckets

    def _make_buckets(self, groups, dtype) -> list:
        out = []
        for i, ps in enumerate(groups):
            b = _Bucket(ps, dtype, i)
            off = 0
            for p in ps:
                b.buffer[off:off + p.data.size] = p.grad.reshape(-1)
                b.layout.append((off, p.data.shape))
                off += p.data.size
            self._attach_grads(b)
            out.append(b)
        return out

    def _attach_grads(self, b: _Bucket) -> None:
        """Each .grad becomes a view into the bucket: accumulate in place, reduce in place."""
        b.views = []
        for p, (off, shape) in zip(b.params, b.layout):
            view = b.buffer[off:off + p.data.size].reshape(shape)
            p.grad = view
            b.views.append(view)

    def _release_grads(self, b: _Bucket) -> None:
        """Drop a bucket's whole gradients (shard="gradients"/"full": the owned slice was kept)."""
        if b.buffer is None:
            return
        for p in b.params:
            p.grad = ZR.freed(p.data.shape, b.buffer.dtype, 0)
        b.buffer, b.views = None, []

    @staticmethod
    def _direct_backward_message(params) -> str:
        name = next(iter(params)).name if params else "?"
        return (f"DataParallel: gradients of {name!r} were produced by model.backward() called directly; "
                "call ddp.backward(dy) so that they are averaged over the ranks (or wrap the call in "
                "ddp.no_sync() to accumulate locally)")

    def _on_ready(self, params) -> None:
        if not self._in_backward:
            if self._sync and self._units is None:
                raise RuntimeError(self._direct_backward_message(params))
            return
        if not (self._sync and self.overlap) or self.group.size == 1 or self._units is not None:
            return
        if self._shared is not None and not self._shared.overlap:  # no spare core: all after backward
            return
        for p in params:
            b = self._bucket_of.get(id(p))
            if b is not None and id(p) in b.pending:
                b.pending.discard(id(p))
                if not b.pending:
                    self._launch_ready()

    def _launch_ready(self) -> None:
        """Launch buckets strictly in index order, each as soon as it and all before it are ready.
        Collectives pair up by issue order, so every rank must issue them in the same order even
        when gradients become ready in a different order (a model whose backward does not run in
        reverse registration order, or a rank with no batch that calls synchronize()); PyTorch DDP
        keeps the same rule."""
        # The last bucket waits for _finish, which waits for it at once: there it runs on this thread
        # when the communication thread is idle (no hand-off, Engine.submit's inline), and its
        # time counts as exposed.
        while self._next < len(self.buckets) - 1 and not self.buckets[self._next].pending:
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, b: _Bucket, error: str | None = None, inline: bool = False) -> None:
        timeline.instant(f"bucket {b.index} ready", "bucket", bytes=b.buffer.nbytes, params=len(b.params))
        if error is None:
            for p, view in zip(b.params, b.views):
                if p.grad is not view:
                    error = (f"DataParallel: parameter {p.name!r}'s .grad was replaced (p.grad = ...) instead of "
                             "accumulated into (p.grad += ...); the new array is not in the gradient bucket, so it "
                             "would not be averaged over the ranks")
                    break
        validating = L.validating()
        if error is not None and not validating:
            self._late_error = self._late_error or error  # raised after the step, whose collectives go on
            error = None
        z, comm, algorithm = self.compressor, self.group.async_comm, self.algorithm
        # at least 0: a pipeline runs its stage's forwards past DataParallel (only the last backward
        # goes through ddp.backward), and a replica with no samples joins through synchronize(): both
        # have no forward without its backward
        fields = {"step": self._steps, "optimizer_steps": self._optimizer_steps(),
                  "training_forwards_without_backward (evaluate with model.eval())":
                      max(0, self._forwards - self._backwards),
                  "bucket": b.index, "key": b.key, "size": b.buffer.size}

        zero, shared = self._zero, self._shared

        def job():
            if shared is not None:  # every rank ready first: a failed check below then fails everywhere
                shared.ready(comm)  # alike, after the same rounds
            if validating:
                L.check(comm, "DataParallel bucket", fields, error)
            if zero is not None:  # shard="optimizer": keep the owned slice of the average
                return zero.reduce(b, comm, algorithm, z)
            if shared is not None:  # the rows of the shared window: nothing copied (shared_buckets.py)
                out = shared.average(b, comm)
                z.stats.record(b.buffer.nbytes, b.buffer.nbytes, shared.sent_bytes(b))
                return out
            return z.reduce_(b, comm, algorithm)

        b.handle = L.submit(job, "allreduce" if z.name == "none" else f"allreduce[{z.spec}]", b.buffer,
                            self.group, inline=inline)

    def _optimizer_steps(self) -> int | None:
        """Steps taken by make_optimizer's optimizer (None without one), checked with every bucket
        and gather: a rank that skipped ``opt.step()`` (a local non-finite check on its own ZeRO
        slice) would otherwise train on silently - with shard="full" no collective tells."""
        return None if self._optimizer is None else self._optimizer.steps

    # ------------------------------------------------------------------------- training
    def forward(self, x):
        try:
            y = self.model.forward(x)
        except BaseException as e:
            # shard="full": a layer outside the units raised mid-plan (a unit's own failure was
            # handled in its wrapper): the rest of the step carries the error to the peers
            if self._units is not None and self._units.phase == "forward":
                self._units.fail(f"rank {world_rank()}: the model's forward raised {type(e).__name__}: {e}",
                                 then_backward=self.model.training)
            raise
        if self.model.training:  # counted once it returned: a forward that raised left nothing to match
            self._forwards += 1
        return y

    __call__ = forward

    def backward(self, dy):
        """Backward through the model; on return every .grad holds the average over ranks.

        If the model's backward raises, the buckets not yet launched are launched carrying the
        error, so every other rank's backward raises CollectiveError instead of waiting for them;
        in-flight work is drained on every exit path, and the exception propagates here."""
        if self._zero is not None and self._optimizer is None and self._sync:
            # the averaged gradients would reach only make_optimizer's parameters: an optimizer over
            # model.parameters() would step on nothing, silently - refuse, on every rank
            self._refuse_step("DataParallel(shard=%r): call ddp.make_optimizer(...) before training; the averaged "
                              "gradients go to the owned shards it optimizes, not to model.parameters()" % self.shard)
        if self._units is not None:
            return self._units.run_backward(dy)
        for b in self.buckets:
            b.pending = {id(p) for p in b.params}
            b.handle = None
        self._next = 0
        self._in_backward = True
        self._backwards += 1
        try:
            dx = self.model.backward(dy)
        except BaseException as e:
            self._in_backward = False
            self._fail_step(f"rank {world_rank()}: the model's backward raised {type(e).__name__}: {e}")
            raise
        self._in_backward = False
        self._finish()
        return dx

    def synchronize(self) -> None:
        """Join this step's gradient averaging without a backward pass: for a rank that has no
        samples in this step (uneven batching, data/bucketing.py). Its ``.grad`` - zero after
        ``opt.zero_grad()`` - enters the average like every other rank's; on return every .grad
        holds the average, as after ``backward``."""
        if self._units is not None:  # the gathers its peers' forward and backward make, then the reductions
            if self.shard == "full":
                self._units.start("forward")
                self._units.finish(release_grads=False)
            self._units.start("backward")
            self._units.end_step()
            return
        for b in self.buckets:
            b.pending, b.handle = set(), None
        self._next = 0
        self._finish()

    def _refuse_step(self, why: str) -> None:
        """Raise `why` here and carry it to every peer through this step's collectives."""
        if self._units is not None:
            self._units.start("backward")
            self._units.fail(why)
        else:
            self._next = 0
            self._fail_step(why)
        raise RuntimeError(why)

    def _fail_step(self, why: str) -> None:
        """Launch the remaining buckets with `why` as their local error, wait for every bucket,
        and forget the step (the peers' buckets all raise CollectiveError)."""
        if self._sync and (self.group.size > 1 or self._zero is not None):
            for b in self.buckets[self._next:]:
                self._launch(b, error=why)
            self._next = len(self.buckets)
            for b in self.buckets:
                if b.handle is not None:
                    try:
                        b.handle.wait()
                    except Exception:  # noqa: BLE001 - the original exception is the one to raise
                        pass
                    b.handle = None
        self._steps += 1
        self._forwards = self._backwards = 0

    def _finish(self) -> None:
        """Launch the buckets the hooks did not, wait for all, account the time."""
        if not self._sync or (self.group.size == 1 and self._zero is None):  # one rank: grads are the average
            return
        t = time.perf_counter()
        for b in self.buckets[self._next:]:  # what the hooks did not launch: waited for at once, so
            self._launch(b, inline=True)    # run here when the communication thread is idle
        self._next = len(self.buckets)
        first = None
        spans = []
        with timeline.span("wait for gradient allreduces", "wait"):
            for b in self.buckets:  # wait for every bucket, even after one failed: nothing left in flight
                try:
                    b.handle.wait()
                except Exception as e:  # noqa: BLE001
                    first = first or e
                spans.append((b.handle.t_start, b.handle.t_end))
                b.handle = None
        t_end = time.perf_counter()
        comm, exposed = _union_and_overlap(spans, t, t_end)
        self.comm_seconds += comm
        self.blocking_overlap_seconds += blocking_overlap(spans)
        self.exposed_comm_seconds += exposed
        self.handoff_seconds += (t_end - t) - exposed
        self._steps += 1
        self._forwards = self._backwards = 0
        late, self._late_error = self._late_error, None
        if first is not None:
            raise first
        if late is not None:
            raise RuntimeError(late)

    # -------------------------------------------------------------------------- sharding
    def make_optimizer(self, cls, **options):
        """An optimizer of class `cls` over exactly what this rank owns; ``opt.step()`` leaves the
        model ready for the next forward on every rank.

        Args:
            cls: a disttrain optimizer class (``optim.SGD``, ``optim.Adam``, ...); one whose update
                needs whole tensors (LAMB) is refused with shard != "none".
            **options: its arguments (``lr=...``, ``momentum=...``). Collective: every rank must pass
                the same class and options (compared by ``repr``), else every rank raises CollectiveError.

        Returns:
            shard="none": ``cls(model.parameters(), **options)``. Otherwise ``cls`` over the owned
            shard Parameters (one per global parameter, views of the owned slice, named globally,
            ``layout=[Piece(None, shape, box, flat=(a, b))]``) and the model's non-replicated
            parameters (sharded embeddings); its post-step hook regathers the parameters
            (optimizer/gradients; "full" gathers at every forward anyway).

        Example:
            >>> opt = ddp.make_optimizer(optim.Adam, lr=1e-3)
        """
        self._optimizer = ZR.make_optimizer(self, cls, options)
        return self._optimizer

    def full_state_dict(self) -> dict:
        """{parameter name: the whole array} on every rank, for every shard mode (collective with
        shard="full": call it on every rank). Tensor-parallel blocks and sharded-embedding rows are
        this rank's (gathered over the data-parallel group only).

        Returns:
            A dict of copies, in ``model.parameters()`` order.
        """
        return ZR.full_state_dict(self)

    def memory(self, optimizer=None) -> dict:
        """This rank's bytes, between steps, of what DataParallel and the optimizer keep.

        Args:
            optimizer: whose state to count (default: the one from ``make_optimizer``).

        Returns:
            {"parameters": the replicated parameters this rank stores (full: its owned slices),
            "gradients": gradient storage kept between steps (none: the buckets; optimizer: the
            buckets and the owned slices; gradients/full: the owned slices), "optimizer": bytes of
            the optimizer's state arrays (0 before its first step), "transient": whole unit
            parameters / gradients held right now beyond that, "peak_transient": the most of those
            held at once so far (gradients/full: about two units)}. Non-replicated parameters
            (sharded embeddings) are not counted.
        """
        return ZR.memory(self, optimizer if optimizer is not None else self._optimizer)

    def parameter_shards(self) -> list:
        """The model parameters this rank holds authoritatively, as ``nn.layout.Shard`` live views:
        the whole replicated parameters (shard none/optimizer/gradients) or the owned flat ranges
        (full), plus the model's non-replicated parameters (sharded embeddings) - what a checkpoint
        writes (a region several ranks hold, once) and fills in place on load.

        Example:
            >>> [(s.name, s.box, s.flat) for s in ddp.parameter_shards()]
        """
        return ZR.parameter_shards(self)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally (gradient accumulation); the next synced backward averages
        the accumulated sum."""
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def parameters(self):
        return self.params

    @property
    def wire_stats(self) -> dict:
        """Gradient bytes of this rank so far: raw, compressed payload, sent on the wire, and the ratio;
        sharded modes add the bytes their reduce-scatters and parameter allgathers sent (ring volumes)
        to ``sent_bytes`` and report them as ``reduce_scatter_sent_bytes`` / ``allgather_sent_bytes``."""
        out = self.compressor.stats.as_dict()
        if self._zero is not None:
            for k, v in self._zero.sent.items():
                out[f"{k}_sent_bytes"] = v
                out["sent_bytes"] += v
        return out


def _union_and_overlap(spans, w0: float, w1: float) -> tuple[float, float]:
    """(length of the union of the intervals `spans`, length of that union inside [w0, w1])."""
    return union_and_overlap(spans, [(w0, w1)])


def broadcast_parameters(model, root: int = 0, group=None) -> None:
    """Make every rank's replicated parameters equal to root's (call once before training);
    model-parallel shards (``Parameter.replicated`` False) are each rank's own and stay."""
    for p in (model.parameters() if hasattr(model, "parameters") else model):
        if p.replicated:
            C.broadcast_(p.data, root=root, group=group)


def broadcast_optimizer_state(opt, root: int = 0, group=None) -> None:
    """Make every rank's optimizer state (momenta, step count, lr) equal to root's (collective
    over the group: every rank calls it at the same point)."""
    g = as_group(group)
    # agreed first (attack9, finding 04): a rank calling it alone, or a bad root, raises on every
    # rank instead of waiting for good in the raw bcast below (which the stall inspector does not see)
    bad = None if isinstance(root, (int, np.integer)) and 0 <= root < g.size else \
        f"root must be a rank of the group (0..{g.size - 1}), got {root!r}"
    L.check(g.comm, "broadcast_optimizer_state", {"root": root if bad is None else None}, bad, always=True)
    meta = g.comm.bcast({k: (v.shape, v.dtype.str) for k, v in opt.state_arrays().items()} | {
        "#steps": opt.steps, "#lr": opt.lr}, root=root)
    opt.steps, opt.lr = meta.pop("#steps"), meta.pop("#lr")
    for key, (shape, dtype) in sorted(meta.items()):
        name, buf = key.rsplit("/", 1)
        st = opt.state.setdefault(name, {})
        if buf not in st:
            st[buf] = np.zeros(shape, np.dtype(dtype))
        C.broadcast_(st[buf], root=root, group=group)
