"""Loading = resharding: each rank fills the Shards it holds now from whatever saved regions
overlap them, reading (memory-mapped) only the entries that overlap, each verified by its own
checksum.

The live arrays are filled in two phases: every rank reads into scratch buffers, the ranks agree
on the outcome (an allgather of each rank's error), and only then are the live arrays
overwritten. So a missing, truncated or corrupt file - even one only a single rank reads, or one
that only one rank's file system lacks - raises the same error on every rank and leaves every
rank's model and optimizer exactly as they were (the caller may fall back to an older checkpoint).
Memory: the scratch buffers double this rank's share of the state for the duration of the load.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from ..nn.layout import Shard, whole
from . import files, manifest, regions
from .manifest import CheckpointError, CorruptCheckpoint


class Entries:
    """The manifest's entries by global name, mapped (and checksum-verified) on first use."""

    def __init__(self, ckpt: str, record: dict):
        self.ckpt, self.files, self.by_name, self._maps = ckpt, record.get("files", {}), {}, {}
        for e in record.get("entries", []):
            self.by_name.setdefault(e["name"], []).append(e)

    def array(self, e: dict) -> np.ndarray:
        # an empty entry takes no bytes, so the next entry starts at its offset: key on the shape too
        k = (e["file"], e["offset"], tuple(e["shape"]), e["dtype"])
        if k not in self._maps:
            self._maps[k] = self._map(e)
        return self._maps[k]

    def _map(self, e: dict) -> np.ndarray:
        path = os.path.join(self.ckpt, e["file"])
        shape, dtype = tuple(e["shape"]), np.dtype(e["dtype"])
        want = self.files.get(e["file"], {}).get("bytes")
        with files.open_regular(path) as f:  # ValueError: missing, unreadable, a FIFO, ...
            size = os.fstat(f.fileno()).st_size
            if size != want:
                raise ValueError(f"checkpoint file {path} has {size} bytes, the manifest says {want} (truncated?)")
            n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if e["offset"] + n > size:
                raise ValueError(f"checkpoint file {path}: entry {e['name']!r} lies past the end of the file")
            a = np.memmap(f, dtype, "r", e["offset"], shape) if n else np.empty(shape, dtype)
        if hashlib.sha256(a.reshape(-1).view(np.uint8) if n else b"").hexdigest() != e["sha256"]:
            raise ValueError(f"checkpoint file {path}: entry {e['name']!r} failed its checksum (corrupt)")
        return a


def _region(e: dict) -> tuple:
    return tuple(tuple(b) for b in e["box"]), tuple(e["flat"]) if e["flat"] is not None else None


def _fill_one(entries: Entries, record: dict, s) -> np.ndarray:
    """A scratch copy of live shard `s` filled from the checkpoint; CheckpointError if it cannot be."""
    info = record["arrays"].get(s.name)
    if info is None:
        raise CheckpointError(f"checkpoint {entries.ckpt} has no array {s.name!r}")
    if tuple(info["shape"]) != tuple(s.shape) or np.dtype(info["dtype"]) != s.data.dtype:
        raise CheckpointError(f"checkpoint {entries.ckpt}: {s.name!r} is {info['dtype']}{tuple(info['shape'])} in "
                              f"the checkpoint but {s.data.dtype}{tuple(s.shape)} here")
    buf = np.empty_like(s.data)
    covered = np.zeros(buf.size, bool)
    dbox, dflat, dview = regions.normalise(s.box, s.flat, buf)
    for e in entries.by_name.get(s.name, []):
        sbox, sflat = _region(e)
        if e["box"] and regions.intersect(dbox, sbox) is None:
            continue  # cheap reject: never map an entry that cannot overlap
        try:
            src = entries.array(e)
        except ValueError as err:
            raise CorruptCheckpoint(str(err)) from err
        sbox, sflat, src = regions.normalise(sbox, sflat, src)
        regions.copy_overlap(dbox, dflat, dview, covered, sbox, sflat, src)
    if not covered.all():
        first = int(np.argmin(covered))
        raise CheckpointError(f"checkpoint {entries.ckpt}: {covered.size - int(covered.sum())} element(s) of "
                              f"{s.name!r} (region {s.box}{f' range {s.flat}' if s.flat else ''}) are in no saved "
                              f"shard (first: element {first} of the region)")
    return buf


def whole_array(entries: Entries, record: dict, name: str) -> np.ndarray:
    """Global array `name` assembled from every entry that holds a part of it (one process: the
    command line's convert)."""
    info = record["arrays"][name]
    return _fill_one(entries, record, Shard(name, tuple(info["shape"]), whole(info["shape"]), None,
                                            np.empty(info["shape"], info["dtype"])))


def agree(comm, err: BaseException | None) -> None:
    """Raise on every rank of `comm` the lowest failing rank's error (its class and message)."""
    mine = None if err is None else (isinstance(err, CorruptCheckpoint), str(err))
    for r, got in enumerate(comm.allgather(mine)):
        if got is not None:
            corrupt, msg = got
            msg = msg if comm.size == 1 else f"{msg} (found on rank {r})"  # the same text on every rank
            raise (CorruptCheckpoint if corrupt else CheckpointError)(msg)


def fill(comm, ckpt: str, record: dict, shards: list) -> None:
    """Collective: fill every rank's live `shards` in place from checkpoint directory `ckpt`
    (its verified manifest `record`), or raise the same CheckpointError (CorruptCheckpoint for a
    damaged checkpoint) on every rank with nothing changed."""
    entries, bufs, err = Entries(ckpt, record), [], None
    try:
        bufs = [_fill_one(entries, record, s) for s in shards]
    except CheckpointError as e:
        err = e
    except Exception as e:  # noqa: BLE001 - anything unexpected must reach the other ranks, not strand them
        err = CheckpointError(f"checkpoint {ckpt}: {type(e).__name__}: {e}")
    agree(comm, err)
    for s, b in zip(shards, bufs):
        s.data[...] = b


def verify(path: str) -> dict:
    """The manifest of checkpoint directory `path` after checking every entry and file against
    its checksum (one process, no MPI); CheckpointError naming the first damage."""
    rec = manifest.read(path)
    entries, digests = Entries(path, rec), {}
    for e in rec["entries"]:
        try:
            entries.array(e)
        except ValueError as err:
            raise CheckpointError(str(err)) from err
        digests.setdefault(e["file"], []).append(e)
    for f, info in rec["files"].items():
        es = sorted(digests.get(f, []), key=lambda e: e["offset"])
        if manifest.file_digest([e["sha256"] for e in es], os.path.getsize(os.path.join(path, f))) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {os.path.join(path, f)} failed its checksum")
    return rec


def newest_valid(directory: str, warn=None) -> tuple:
    """(path, manifest) of the newest checkpoint in `directory` that verifies - the one a resume
    loads, since a resume skips damaged ones the same way - or (None, None). One process, no MPI
    (the elastic launcher asks it between launches)."""
    for path in manifest.candidates(directory, warn):
        try:
            return path, verify(path)
        except CheckpointError as e:
            if warn:
                warn(f"[disttrain] skipping {e}")
    return None, None
