"""Writing one checkpoint directory: every rank its own shards, in parallel; rank 0 the manifest.

1. Every rank announces what it holds (name, shape, dtype, region) - a small allgather. A region
   several ranks hold (replicated parameters, tensor-parallel replicated biases, ...) is written
   once, by one of them, balancing bytes over the holders: a decision every rank computes from the
   same list, so it is identical everywhere without further messages. Shapes or dtypes of one name that differ between ranks
   are an error on every rank.
2. Rank 0 creates ``step-N.tmp-<host>-<pid>-<rand>/`` (after removing dead writers'
   temporaries) and broadcasts its name; each rank writes ``rank-R.bin`` there and fsyncs it.
3. Rank 0 gathers every rank's entries (offsets, checksums) and errors. On any error it removes
   the temporary directory and every rank raises the same CheckpointError; otherwise it writes
   the manifest last, fsyncs it and the directory, renames the directory into place and fsyncs
   the parent. A crash at any point leaves the previous checkpoints and at most a temporary that
   no reader trusts (it has no verified manifest under a ``step-N`` name).
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from .. import faults
from . import files, manifest
from .manifest import CheckpointError


def _key(s) -> tuple:
    return (s.name, tuple(map(tuple, s.box)), tuple(s.flat) if s.flat is not None else None)


def _describe(s) -> tuple:
    return _key(s) + (tuple(int(n) for n in s.shape), np.dtype(s.data.dtype).str)


def _plan(comm, shards: list) -> tuple[list, dict, str | None]:
    """(the shards this rank writes, {name: {shape, dtype}}, error): identical on every rank."""
    everyone = comm.allgather([_describe(s) for s in shards])
    holders, nbytes, arrays, err = {}, {}, {}, None
    for r, descs in enumerate(everyone):
        for name, box, flat, shape, dtype in descs:
            k = (name, box, flat)
            if r not in holders.setdefault(k, []):
                holders[k].append(r)
            size = (flat[1] - flat[0]) if flat else int(np.prod([b - a for a, b in box], dtype=np.int64))
            nbytes[k] = size * np.dtype(dtype).itemsize
            a = arrays.setdefault(name, {"shape": list(shape), "dtype": np.dtype(dtype).name})
            if (a["shape"], a["dtype"]) != (list(shape), np.dtype(dtype).name) and err is None:
                err = (f"global array {name!r} is {a['dtype']}{tuple(a['shape'])} on one rank but "
                       f"{np.dtype(dtype).name}{shape} on rank {r}: the ranks disagree about the model")
    # Each region is written once, by one of its holders: largest first, to the holder with the
    # fewest bytes so far - so replicated data-parallel state is written by all ranks in parallel,
    # not all by rank 0. Every rank computes this from the same gathered list: the same owners.
    load, owner = [0] * comm.size, {}
    for k in sorted(holders, key=lambda k: (-nbytes[k], str(k))):
        r = min(holders[k], key=lambda r: (load[r], r))
        owner[k] = r
        load[r] += nbytes[k]
    seen, mine = set(), []
    for s in shards:
        k = _key(s)
        if owner[k] == comm.rank and k not in seen:
            seen.add(k)
            mine.append(s)
    return mine, arrays, err


def _write_shards(tmp: str, rank: int, shards: list) -> tuple[list, dict | None]:
    """Write this rank's shards to ``tmp/rank-R.bin``; (entries, file record or None)."""
    if not shards:
        return [], None
    fname, entries, chunks, off = manifest.shard_file(rank), [], [], 0
    for s in shards:
        a = np.ascontiguousarray(s.data)
        pad = -off % manifest.ALIGN
        if pad:
            chunks.append(b"\0" * pad)
            off += pad
        raw = a.reshape(-1).view(np.uint8) if a.size else b""
        h = hashlib.sha256(raw).hexdigest()
        entries.append(dict(name=s.name, file=fname, offset=off, shape=list(a.shape), dtype=a.dtype.str,
                            box=[list(b) for b in s.box], flat=list(s.flat) if s.flat is not None else None, sha256=h))
        chunks.append(raw)
        off += a.nbytes
    size = files.write_durable(os.path.join(tmp, fname), (memoryview(c) for c in chunks))
    faults.point("checkpoint-shards")  # tests: die after the shards, before the manifest
    return entries, dict(bytes=size, rank=rank, sha256=manifest.file_digest([e["sha256"] for e in entries], size))


def _start(directory: str, step: int) -> str:
    files.makedirs_durable(directory)
    for final, old in manifest.orphans(directory, dead_only=True):  # before the cleanup below deletes it
        os.rename(old, os.path.join(directory, final))
    files.remove_stale(directory, manifest.TMP)
    tmp = manifest.dir_for(directory, step) + files.tmp_suffix("tmp")
    os.mkdir(tmp)
    return tmp


def _publish(directory: str, step: int, tmp: str, record: dict) -> str:
    """Manifest last, fsyncs, rename into place (moving aside a checkpoint of the same step)."""
    manifest.write(os.path.join(tmp, manifest.MANIFEST), record)
    files.fsync_dir(tmp)
    final = manifest.dir_for(directory, step)
    faults.point("checkpoint-write")  # tests: die with everything written, before the rename
    old = None
    if os.path.isdir(final) and not os.path.islink(final) and manifest.is_checkpoint(final):
        old = final + files.tmp_suffix("old")  # the same step written again (end of run)
        os.rename(final, old)
    os.rename(tmp, final)  # fails if a file or another directory is in the way: nothing is replaced
    files.fsync_dir(directory)
    if old:
        files.remove_quietly(old)
    return final


def write(comm, directory: str, step: int, shards: list, record: dict, per_rank=None) -> str:
    """Collective over `comm`: write `shards` (nn.layout.Shard) of every rank and the manifest
    fields in `record` (rank 0's) as checkpoint `step` of `directory`; `per_rank` (JSON) becomes
    ``manifest["per_rank"][rank]``. Returns the checkpoint's path on every rank, or raises the
    same CheckpointError on every rank (the directory is then left as it was)."""
    mine, arrays, err = _plan(comm, shards)
    tmp = None
    if comm.rank == 0 and err is None:
        try:
            tmp = _start(directory, step)
        except Exception as e:  # noqa: BLE001 - whatever it is, the other ranks must hear of it
            err = f"{type(e).__name__}: {e}"
    tmp, err = comm.bcast((tmp, err), root=0)
    if err:
        raise CheckpointError(f"checkpoint {manifest.dir_for(directory, step)} could not be written: {err}")
    entries, frec, werr = [], None, None
    try:
        entries, frec = _write_shards(tmp, comm.rank, mine)
    except Exception as e:  # noqa: BLE001 - full disk, quota, a vanished directory, ...: agreed below
        werr = f"rank {comm.rank}: {type(e).__name__}: {e}"
    gathered = comm.gather((entries, frec, werr, per_rank), root=0)
    final = None
    if comm.rank == 0:
        errs = [g[2] for g in gathered if g[2]]
        try:
            if errs:
                raise OSError("; ".join(errs))
            rec = dict(record, format=manifest.FORMAT, version=manifest.VERSION, step=int(step),
                       world_size=comm.size, arrays=arrays, entries=[e for g in gathered for e in g[0]],
                       files={manifest.shard_file(g[1]["rank"]): g[1] for g in gathered if g[1]},
                       per_rank=[g[3] for g in gathered])
            final = _publish(directory, step, tmp, rec)
        except Exception as e:  # noqa: BLE001 - an OSError, or metadata JSON cannot encode: agreed below
            err = f"{type(e).__name__}: {e}" if not errs else "; ".join(errs)
            files.remove_quietly(tmp)
    final, err = comm.bcast((final, err), root=0)
    if err:
        raise CheckpointError(f"checkpoint {manifest.dir_for(directory, step)} could not be written: {err}")
    return final
