"""Replicas that should be equal, checked: ``dt.check_replicas(model, opt)``.

Data parallelism keeps every replica bit-identical by construction - each rank applies the same
averaged gradients (reduced in one fixed order, comm/api.py) with the same optimizer - as long as
the program builds the same optimizer everywhere. A custom loop that does not (one rank with
another learning rate, a momentum buffer reset on one rank, a parameter edited on one rank)
trains on with replicas that drift apart, and nothing in the gradient averaging can see it: the
gradients still agree in shape and count (attack9; PyTorch DDP does not catch it either). The main
job agrees its whole configuration and a sharded DataParallel its optimizer's hyper-parameters;
this is the check for everything else, to call every N steps or before a checkpoint.

Cost: one pass over the replicated parameters (and the optimizer's state) at memory speed for a
64-bit BLAKE2b digest per array, then one allgather of the digests - a few ms for a 10 MB model.
"""
from __future__ import annotations

import hashlib
import numbers

import numpy as np

from ..comm import validate
from ..errors import CollectiveError
from ..groups import as_group


def _digest(a: np.ndarray) -> bytes:
    """64 bits of BLAKE2b over the array's dtype, shape and bytes (bit-level equality, as the
    replicas are meant to be: -0.0 differs from 0.0 and NaN payloads count)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data)
    return h.digest()


def _hyper(opt) -> dict:
    """The optimizer's scalar settings (lr, momentum, betas, step count, ...): every public
    attribute that is a number, bool, str or a tuple of them."""
    def scalar(v):
        return isinstance(v, (numbers.Number, bool, str)) or (isinstance(v, tuple) and all(map(scalar, v)))
    return {k: v for k, v in sorted(vars(opt).items()) if not k.startswith("_") and scalar(v)}


def check_replicas(model, opt=None, group=None) -> None:
    """Raise CollectiveError on every rank of `group` if the data-parallel replicas differ.

    Collective over the group (every rank calls it at the same point). Compares, bit for bit,
    every replicated parameter of `model` (``Parameter.replicated``; model-parallel shards are each
    rank's own and skipped) and, with `opt`, the optimizer's state arrays and scalar settings
    (learning rate, momentum, step count, ...). The error names the first differing entry and
    which ranks hold which version.

    Args:
        model: a Module, a DataParallel (its module and, by default, its group) or a list of
            Parameters.
        opt: an optimizer whose state and settings must agree too (optional).
        group: the data-parallel group (default: the DataParallel's, else the world).

    Example:
        >>> for step in range(steps):
        ...     train_step()
        ...     if step % 100 == 0:
        ...         dt.check_replicas(ddp, opt)   # replicas still identical?
    """
    if hasattr(model, "shard") and hasattr(model, "model"):  # a DataParallel: its module, its group
        if model.shard == "full":
            raise ValueError("check_replicas: DataParallel(shard='full') holds no replicas (each rank owns a "
                             "shard); its make_optimizer agrees the optimizer's settings instead")
        group = model.group if group is None else group
        model = model.model
    g = as_group(group)
    params = model.named_parameters() if hasattr(model, "named_parameters") else (
        (p.name or f"param{i}", p) for i, p in enumerate(model))
    entries = [(f"parameter {name!r}", _digest(p.data)) for name, p in params if p.replicated]
    if opt is not None:
        entries += [(f"optimizer state {k!r}", _digest(v)) for k, v in sorted(opt.state_arrays().items())]
        # settings travel as their repr, so the error can say who has which value
        entries += [(f"optimizer setting {k!r}", repr(v).encode()) for k, v in _hyper(opt).items()]
    # the set-up check first: a rank that calls this alone raises with its peers instead of
    # waiting in the allgather; the entry count is part of what must agree
    validate.check(g.comm, "check_replicas", {"entries": len(entries), "opt": opt is not None}, None, always=True)
    every = g.comm.allgather([d for _, d in entries])
    for i, (what, _) in enumerate(entries):
        versions = {}
        for r, ds in enumerate(every):
            versions.setdefault(ds[i], []).append(r)
        if len(versions) > 1:
            setting = what.startswith("optimizer setting")
            who = "; ".join(f"ranks {rs}" + (f" have {d.decode()}" if setting else "")
                            for d, rs in sorted(versions.items(), key=lambda kv: kv[1]))
            raise CollectiveError(f"check_replicas: the data-parallel replicas differ at {what} ({who}); "
                                  f"the first difference of {len(entries)} entries compared")
