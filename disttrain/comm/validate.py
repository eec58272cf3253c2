"""Cross-rank consistency check: every rank must call the same collective with matching arguments.

Mismatches (shape, dtype, op, algorithm, root, ...) or a local argument error on any one rank would
otherwise hang the job or silently produce wrong numbers. The check is one tiny MPI_Allreduce with
MPI_BAND over three int64 words ``[ok, h, ~h]`` where ``h`` is a 63-bit hash of the call's
signature: AND(h_i) == ~AND(~h_i) == OR(h_i) holds exactly when every h_i is equal, and the first
word is 0 when any rank found a local error. Only when that fails do the ranks gather readable
descriptions (a pickled allgather, off the hot path) so that every rank raises the same
CollectiveError naming who passed what.
"""
from __future__ import annotations

import hashlib

import numpy as np

from . import config
from .errors import CollectiveError


_MPI = None  # mpi4py.MPI, bound on first use (importing it starts MPI)
_hashes: dict = {}  # signature tuple -> 63-bit hash (repr + blake2b costs ~5 us; a lookup ~0.2 us)


def _hash(kind: str, fields: dict) -> int:
    sig = (kind, *fields.items())
    try:
        h = _hashes.get(sig)
    except TypeError:  # an unhashable field value: hash it uncached
        sig, h = None, None
    if h is None:
        # repr, not hash(): Python's str hashes are salted per process, so ranks would disagree.
        d = hashlib.blake2b(repr((kind, sorted(fields.items(), key=str))).encode(), digest_size=8).digest()
        h = int.from_bytes(d, "little") >> 1  # 63 bits: a non-negative int64
        if sig is not None and len(_hashes) < 65536:
            _hashes[sig] = h
    return h


def check(comm, kind: str, fields: dict, local_error: str | None, always: bool = False) -> None:
    """Raise CollectiveError on every rank of `comm` if any rank has an error or a different signature.

    Args:
        comm: the MPI communicator the collective is about to use.
        kind: collective name ("allreduce", ...).
        fields: what must agree across ranks (shape, dtype, op, algorithm, root, ...).
        local_error: a message if this rank's own arguments are invalid, else None.
        always: check even when validation is switched off (set-up calls: meshes, pipelines,
            DataParallel - once per job, never in the hot loop).
    """
    if not (config.settings.validate or always):
        if local_error:
            raise CollectiveError(local_error)
        return
    global _MPI
    if _MPI is None:
        from mpi4py import MPI as _MPI
    h = _hash(kind, fields)
    v = np.array((0 if local_error else -1, h, ~h), dtype=np.int64)
    comm.Allreduce(_MPI.IN_PLACE, v, op=_MPI.BAND)
    if v[0] == -1 and v[1] == ~v[2]:
        return
    infos = comm.allgather((local_error, kind, fields))
    raise CollectiveError(describe(infos))


def describe(infos) -> str:
    """One message, identical on every rank, saying which ranks disagree and how."""
    errors = [(r, e) for r, (e, _, _) in enumerate(infos) if e]
    if errors:
        first = errors[0][1]
        ranks = [r for r, e in errors if e == first]
        more = f" (and {len(errors) - len(ranks)} other error(s) on other ranks)" if len(errors) > len(ranks) else ""
        return f"rank(s) {ranks}: {first}{more}"
    kinds = {k for _, k, _ in infos}
    if len(kinds) > 1:
        calls = ", ".join(f"rank {r}: {k}" for r, (_, k, _) in enumerate(infos))
        return f"ranks called different collectives at the same point ({calls})"
    kind = infos[0][1]
    keys = sorted({key for _, _, f in infos for key in f})
    parts = []
    for key in keys:
        vals = [f.get(key) for _, _, f in infos]
        if any(v != vals[0] for v in vals):
            groups: dict = {}
            for r, v in enumerate(vals):
                groups.setdefault(repr(v), []).append(r)
            parts.append(f"{key}: " + "; ".join(f"ranks {rs} passed {v}" for v, rs in groups.items()))
    return f"{kind}: arguments differ across ranks - " + " | ".join(parts)
