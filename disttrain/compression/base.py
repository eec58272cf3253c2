"""The compressor interface, the registry of compressors, and wire-byte accounting.

A compressor has two faces:

- local transforms, ``compress(x, key) -> (payload, ctx)`` and ``decompress(payload, ctx) -> x'``:
  what one rank would send for gradient `x` and what that message stands for. Stateful compressors
  (error feedback, PowerSGD's warm start) update their state in ``compress``; ``x'`` is exactly
  the part of the accumulated gradient that was transmitted, so that transmitted + residual ==
  gradient + previous residual (the error-feedback invariant, Seide et al. 2014; Karimireddy et al.
  2019).
- the collective, ``reduce_(buf, key, comm, ...)``: averages `buf` over the ranks of `comm`
  through the collective that fits the payload - a reduction algorithm with a narrow wire format
  for fp16/bf16, an allgather of the sparse or packed payloads for top-k and 1-bit, allreduces of
  the low-rank factors for PowerSGD. Every rank ends with bit-identical values.

State lives in ``self.state[key]`` (a dict of arrays) where `key` is a stable bucket name, so it
can be inspected, checkpointed (``state_dict``) and restored (``load_state_dict``).

Steps are transactions. A training step whose averaged gradient turns out non-finite is skipped
(the optimizer does not step), and the compressor must forget it too: error feedback would
otherwise carry the NaN in its residual, and PowerSGD in its warm-start Q, into every later step
(one bad batch poisoned a whole run). So a step never writes over the state it started from: the
first time a step touches a key, the key's arrays are kept as its rollback point and the step
writes its new arrays into a second set of buffers (double buffering). ``rollback()`` swaps the
kept arrays back; ``commit()`` - or the next step touching a key again - makes the new ones
permanent and recycles the old ones as the next step's buffers. Cost: twice the state's memory,
no copies (the new residual is computed as ``old + gradient`` straight into the spare buffer,
the same single pass as the former in-place ``+=``), O(number of state arrays) per commit/rollback.
"""
from __future__ import annotations

import numpy as np

from ..comm import lowlevel as L
from ..registry import Registry, split

class Bucket:
    """A flat gradient buffer handed to a communication hook (every compressor's ``reduce_``), as
    PyTorch DDP hands a GradBucket to its comm hooks.

    Attributes:
        buffer: 1-D contiguous float32/float64 array: this rank's gradients; the hook leaves the
            average over the ranks in it.
        key: stable name ("b<index>:<first param>..<last param>" in DataParallel): keys any state
            the hook keeps across steps (error feedback, warm starts).
        layout: [(offset, shape), ...] of the tensors packed in buffer (None: one tensor).
        index: position in DataParallel's bucket order (0 for a standalone buffer).
        params: the Parameters whose gradients the buffer holds (empty for a standalone buffer).
    """

    __slots__ = ("buffer", "key", "layout", "index", "params")

    def __init__(self, buffer: np.ndarray, key: str = "default", layout=None, index: int = 0, params=()):
        self.buffer, self.key, self.layout, self.index, self.params = buffer, key, layout, index, params

    def __repr__(self) -> str:
        return f"Bucket({self.key!r}, {self.buffer.size} x {self.buffer.dtype})"


#: name -> Compressor subclass (the package-wide Registry idiom, disttrain/registry.py)
COMPRESSORS = Registry("compression")


def register(name: str):
    """Class decorator: make a Compressor subclass available as ``make(name)`` / ``make("name:param")``."""
    def deco(cls):
        cls.name = name
        cls.takes_param = cls.param is not None
        return COMPRESSORS.register(name)(cls)

    return deco


def make(spec):
    """A compressor from a spec: None/"none", "fp16", "bf16", "topk:0.01", "onebit", "powersgd:2", or
    an existing Compressor (returned as is). Raises ValueError with the choices for anything else."""
    if spec is None:
        spec = "none"
    if isinstance(spec, Compressor):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"compression must be a name or a Compressor, got {type(spec).__name__}")
    base, param = split(spec)
    cls = COMPRESSORS.get(base)
    if cls is None:
        raise ValueError(f"unknown compression {spec!r}; choose one of {names()}")
    if param and cls.param is None:
        raise ValueError(f"compression {base!r} takes no parameter (got {spec!r})")
    try:
        return cls(cls.param(param)) if param else cls()
    except ValueError as e:
        raise ValueError(f"compression {spec!r}: {e}") from None


def names() -> list:
    """Registered names, with their parameter where they take one (e.g. "topk:RATIO")."""
    return [n + (f":{c.param_name}" if c.param else "") for n, c in COMPRESSORS.items()]


class WireStats:
    """Bytes moved by one compressor, summed over its ``reduce_`` calls on this rank.

    raw: the uncompressed gradient bytes; payload: the compressed message this rank contributes;
    sent: bytes this rank puts on the wire with a bandwidth-optimal algorithm for the collective
    used (ring allreduce 2(p-1)/p * n, allgather (p-1) * payload), the same formula for the
    uncompressed baseline, so that ratios compare like with like.
    """

    __slots__ = ("calls", "raw", "payload", "sent")

    def __init__(self):
        self.calls = self.raw = self.payload = self.sent = 0

    def record(self, raw: int, payload: int, sent: int) -> None:
        self.calls += 1
        self.raw += int(raw)
        self.payload += int(payload)
        self.sent += int(sent)

    def as_dict(self) -> dict:
        return {"calls": self.calls, "raw_bytes": self.raw, "payload_bytes": self.payload,
                "sent_bytes": self.sent, "ratio": self.raw / self.payload if self.payload else None}


def ring_allreduce_bytes(n_elems: int, itemsize: int, p: int) -> int:
    """Bytes one rank sends in a ring allreduce of n elements: every block but one, twice."""
    if p == 1:
        return 0
    counts, _ = L.blocks(n_elems, p)
    return 2 * (n_elems - min(counts)) * itemsize


def allgather_equal(comm, payload: np.ndarray) -> np.ndarray:
    """Every rank's `payload` (uint8, the same length everywhere), stacked: shape (p, len)."""
    p, r = comm.Get_size(), comm.Get_rank()
    m = payload.shape[0]
    out = np.empty((p, m), np.uint8)
    out[r] = payload
    if p > 1 and m:
        counts = np.full(p, m, np.int64)
        displs = np.arange(p, dtype=np.int64) * m
        L.allgather_on(comm, out.reshape(-1), counts, displs)
    return out


class Compressor:
    """Base class; the identity compressor's behaviour. Subclasses override what differs.

    Attributes:
        name: registry name.
        param, param_name: the parameter parser (e.g. float) and its name, or None.
        state: key -> {array name: ndarray}, the per-bucket state of stateful compressors.
        stats: :class:`WireStats`.
    """

    name = "none"
    param = None
    param_name = ""

    def __init__(self):
        self.state: dict = {}
        self.stats = WireStats()
        self._undo: dict = {}   # key -> its state dict at the start of the open step (None: absent)
        self._spare: dict = {}  # key -> {array name: buffer} free for the next step's new values

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    @property
    def spec(self) -> str:
        """The string that ``make`` turns back into an equivalent compressor."""
        return self.name

    # ------------------------------------------------------------------------------ local
    def compress(self, x: np.ndarray, key: str = "default", layout=None):
        """(payload, ctx): the message for gradient `x` and what is needed to decode it."""
        return np.ascontiguousarray(x).reshape(-1).copy(), (x.shape, x.dtype)

    def decompress(self, payload, ctx) -> np.ndarray:
        """The dense array a payload stands for (for the identity: the gradient itself)."""
        shape, dtype = ctx
        return np.asarray(payload, dtype).reshape(shape)

    # ------------------------------------------------------------------------- collective
    def reduce_(self, bucket: Bucket, comm, algorithm: str = "auto") -> np.ndarray:
        """The communication hook: average ``bucket.buffer`` over `comm` in place; return it.
        One signature for every compressor.

        Args:
            bucket: this rank's gradients and their stable key and layout (a Bucket).
            comm: the MPI communicator (DataParallel passes its group's communication-thread comm).
            algorithm: the allreduce algorithm for compressors that reduce through one ("auto" for
                the others: ``check_algorithm``).
        """
        buf = bucket.buffer
        L.allreduce_on(comm, buf, "avg", algorithm)
        self.stats.record(buf.nbytes, buf.nbytes, ring_allreduce_bytes(buf.size, buf.itemsize, comm.Get_size()))
        return buf

    #: how the payload travels: "allreduce" (any allreduce algorithm applies), "allgather" (sparse
    #: or packed payloads that cannot be summed on the wire: top-k, 1-bit), "ring" (fp16/bf16).
    exchange = "allreduce"

    def check_algorithm(self, algorithm: str) -> str | None:
        """Why this compressor cannot use `algorithm` (None if it can): one rule for every
        compressor, instead of some refusing an algorithm others silently ignore."""
        if self.exchange == "allgather" and algorithm != "auto":
            return (f"compression {self.spec!r} exchanges its payload with an allgather, so an allreduce "
                    f"algorithm does not apply: use algorithm='auto' (got {algorithm!r})")
        return None

    # ---------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Flat {"key/array": ndarray} copy of the state (for checkpoints): the latest step's."""
        return {f"{k}/{n}": a.copy() for k, st in sorted(self.state.items()) for n, a in sorted(st.items())}

    def load_state_dict(self, d: dict) -> None:
        """Restore what :meth:`state_dict` returned (and close any open step)."""
        self.state, self._undo, self._spare = {}, {}, {}
        for name, a in d.items():
            key, arr = name.rsplit("/", 1)
            self.state.setdefault(key, {})[arr] = np.array(a, copy=True)

    # ----------------------------------------------------------------- step transactions
    def commit(self) -> None:
        """Make the open step's state changes permanent.

        Optional: the next step's first touch of a key already touched in the open step commits
        it. Call it after an applied optimizer step to close the step explicitly.
        """
        for key, old in self._undo.items():
            if old is not None:
                self._spare[key] = old  # the superseded arrays become the next step's buffers
        self._undo = {}

    def rollback(self) -> None:
        """Restore every key's state to what it was before the open step (a skipped step): the
        state, and so every later output, is then exactly as if the step had never run. Call it on
        every rank of the group (the state is per rank, but a skipped step is skipped everywhere)."""
        for key, old in self._undo.items():
            self._spare[key] = self.state.pop(key)
            if old is not None:
                self.state[key] = old
        self._undo = {}

    def _begin(self, key: str) -> dict:
        """The state dict of `key` for the open step; the first touch keeps the current one as the
        rollback point. Touching a key twice means a new step began: commit the previous one
        (DataParallel reduces each bucket once per step)."""
        if key in self._undo:
            self.commit()
        old = self.state.get(key)
        self._undo[key] = old
        st = self.state[key] = {} if old is None else dict(old)  # untouched arrays stay shared
        return st

    def _new(self, key: str, name: str, shape, dtype):
        """(previous array or None, buffer for this step's new value of state array `name`).

        Requires ``_begin(key)`` in this step. The buffer is never the previous array (that one is
        the rollback point); after the call ``self.state[key][name]`` is the buffer."""
        shape, dtype = tuple(shape), np.dtype(dtype)
        before = self._undo[key]
        old = None if before is None else before.get(name)
        if old is not None and (old.shape != shape or old.dtype != dtype):
            old = None  # the bucket changed shape: start again from zeros/fresh
        buf = self._spare.get(key, {}).pop(name, None)
        if buf is None or buf is old or buf.shape != shape or buf.dtype != dtype:
            buf = np.empty(shape, dtype)
        self.state[key][name] = buf
        return old, buf

    def _accumulate(self, key: str, x: np.ndarray) -> np.ndarray:
        """This step's error-feedback accumulator for `key`: previous residual + x (1-D), in a
        buffer that becomes the new residual (the compressor leaves in it what it did not send;
        Seide et al. 2014; Karimireddy et al. 2019). The previous residual is left untouched."""
        self._begin(key)
        flat = np.ascontiguousarray(x).reshape(-1)
        old, acc = self._new(key, "residual", (x.size,), x.dtype)
        if old is None:
            acc[...] = flat
        else:
            np.add(old, flat, out=acc)
        return acc


register("none")(Compressor)


def whole(buf: np.ndarray, layout):
    """layout, or one entry covering all of buf when None."""
    return [(0, buf.shape)] if layout is None else layout
