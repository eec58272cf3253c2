"""One registry per collective family, keyed by algorithm name.

Every member of a family has the same signature (documented on the family below), so tests and
benchmarks loop over ``ALLREDUCE.names()`` and a new algorithm is one decorated function - with its
cost formula registered beside it (``cost=``), which is all algorithm="auto" needs to consider it.
A name may carry one parameter after a colon ("ps:2"); it reaches the function as ``param=``.
"""
from __future__ import annotations

import functools
import sys
import time

from . import config
from ..registry import Registry as _Registry
from ..registry import split
from .errors import CollectiveError


class Registry(_Registry):
    """A collective family: the generic registry plus the signature every member shares, numeric
    parameters ("ps:2"), and verbose logging of each call."""

    def __init__(self, family: str, signature: str):
        super().__init__(f"{family} algorithm")
        self.family, self.signature = family, signature
        self._resolved: dict = {}
        self.costs: dict = {}  # name -> (cost(c, n[, param]) -> seconds, default per-call overhead)
        self.into: dict = {}  # name -> fn(comm, src, dst, op): the out-of-place form, where one exists

    def register(self, name: str, *, takes_param: bool = False, cost=None, overhead: float = 0.0):
        """Decorator: add an algorithm; `cost(c: CostParams, nbytes[, param]) -> seconds` is its
        alpha-beta-gamma formula (comm/cost.py) and `overhead` its per-call software cost until
        calibrate() measures it - what algorithm="auto" compares."""
        if cost is not None:
            self.costs[name] = (cost, overhead)
        return super().register(name, takes_param=takes_param)

    def out_of_place(self, name: str):
        """Decorator: the out-of-place form ``fn(comm, src, dst, op)`` of algorithm `name` (the
        family's signature with a separate result buffer), which the out-of-place public call
        uses to skip copying the input into a work buffer first."""
        def deco(fn):
            self.into[name] = fn
            return fn
        return deco

    def problem(self, name) -> str | None:
        """Why `name` is not a valid algorithm of this family (None if it is); "auto" is accepted."""
        p = super().problem(name, allow=("auto",))
        if p is None and isinstance(name, str):
            base, param = split(name)
            if param and base == "auto":
                return f"{self.family} algorithm 'auto' takes no parameter (got {name!r})"
            if param and not param.isdigit():
                return f"{self.family} algorithm parameter must be a positive integer, got {name!r}"
        return p

    def resolve(self, name: str):
        """The function for a validated, non-auto name (cached); logged when verbose is on."""
        fn = self._resolved.get(name)
        if fn is None:
            fn = self._resolved[name] = self._resolve(name)
        return _logged(self.family, name, fn) if config.current().verbose else fn

    def _resolve(self, name: str):
        base, param = split(name)
        fn = self._fns.get(base)
        if fn is None:
            raise CollectiveError(self.problem(name) or f"cannot resolve {name!r}")
        return functools.partial(fn, param=int(param)) if param else fn


#: fn(comm, buf, op) -> None. buf: 1-D contiguous, in the accumulation dtype; reduced in place on
#: every rank. op: a kernel op code (ops.SUM/PROD/MIN/MAX; avg arrives as SUM).
ALLREDUCE = Registry("allreduce", "fn(comm, buf, op)")
#: fn(comm, buf, op, counts, displs) -> ndarray: the fully reduced block `rank` of buf.
REDUCE_SCATTER = Registry("reduce_scatter", "fn(comm, buf, op, counts, displs)")
#: fn(comm, buf, counts, displs) -> None: block `rank` of buf is filled in; afterwards all are.
ALLGATHER = Registry("allgather", "fn(comm, buf, counts, displs)")
#: fn(comm, buf, root) -> None: buf on every rank ends equal to buf on root.
BROADCAST = Registry("broadcast", "fn(comm, buf, root)")
#: fn(comm, send, scounts, sdispls) -> (recv, rcounts): uint8 buffers and byte counts; block j of
#: `send` goes to rank j; `recv` (allocated by the algorithm, which finds out the incoming sizes its
#: own way) concatenates the blocks from ranks 0..p-1, rcounts[i] bytes from rank i.
ALLTOALL = Registry("alltoall", "fn(comm, send, scounts, sdispls) -> (recv, rcounts)")


def _logged(family: str, name: str, fn):
    """Wrap an algorithm so that each call prints rank, family, algorithm, bytes and duration."""

    def run(comm, buf, *args, **kw):
        t = time.perf_counter()
        out = fn(comm, buf, *args, **kw)
        sys.stderr.write(f"[disttrain r{comm.Get_rank()}/{comm.Get_size()}] {family} {name} {buf.nbytes} B "
                         f"{1e6 * (time.perf_counter() - t):.1f} us\n")
        return out

    return run
