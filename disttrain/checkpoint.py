"""Atomic, pickle-free, checksummed checkpoints.

A checkpoint is one .npz file of named arrays plus a JSON metadata record (step, configuration,
...) and a SHA-256 over the metadata and every array. It is written to a temporary file in the same directory,
fsync'ed, then renamed over the final name (an atomic replace on POSIX), and the directory entry is
fsync'ed: a crash at any moment leaves either the previous checkpoint or the new one, never a torn
file. Loading uses ``allow_pickle=False`` and refuses a file whose checksum does not match.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

from . import faults

_META = "__meta__"


def _digest(arrays: dict, meta: dict) -> str:
    """SHA-256 over the metadata (canonical JSON) and every array's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save(path: str, arrays: dict, meta: dict) -> None:
    """Write `arrays` (name -> ndarray) and `meta` (JSON-serialisable) atomically to `path`."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    safe = {k.replace("/", "::"): np.ascontiguousarray(v) for k, v in arrays.items()}
    record = dict(meta, sha256=_digest(safe, meta))
    _remove_stale_tmp(d)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **safe, **{_META: np.frombuffer(json.dumps(record).encode(), np.uint8)})
        f.flush()
        os.fsync(f.fileno())
    faults.point("checkpoint-write")  # tests: die between the write and the rename
    os.replace(tmp, path)
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_tmp(directory: str) -> None:
    """Delete temporary files of writers that died mid-write (their process no longer exists)."""
    for f in os.listdir(directory):
        m = re.fullmatch(r"ckpt-\d{8}\.npz\.tmp-(\d+)", f)
        if m and int(m.group(1)) != os.getpid():
            try:
                os.kill(int(m.group(1)), 0)
            except ProcessLookupError:
                os.remove(os.path.join(directory, f))
            except PermissionError:
                pass  # someone else's live process


def load(path: str) -> tuple[dict, dict]:
    """(arrays, meta) from `path`; ValueError if the file is corrupt or its checksum does not match."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != _META}
            meta = json.loads(bytes(z[_META]).decode())
    except Exception as e:  # noqa: BLE001 - zip, npy and JSON layers each raise their own types
        raise ValueError(f"checkpoint {path} is unreadable or corrupt: {type(e).__name__}: {e}") from e
    want = meta.pop("sha256", None)
    if want != _digest(arrays, meta):
        raise ValueError(f"checkpoint {path} failed its checksum: the file is corrupt")
    return {k.replace("::", "/"): v for k, v in arrays.items()}, meta


def path_for(directory: str, step: int) -> str:
    return os.path.join(directory, f"ckpt-{step:08d}.npz")


def latest_valid(directory: str, warn=print) -> tuple[str | None, dict, dict]:
    """(path, arrays, meta) of the newest checkpoint that loads and passes its checksum, newest
    first; each corrupt or unreadable one is reported through `warn` and skipped, so a torn or
    damaged newest file costs one checkpoint interval, never the run. (None, {}, {}) if none."""
    for path in reversed(_checkpoints(directory)):
        try:
            arrays, meta = load(path)
            return path, arrays, meta
        except ValueError as e:
            warn(f"[disttrain] skipping {e}")
    return None, {}, {}


def latest(directory: str) -> str | None:
    """The checkpoint with the highest step in `directory` (None if there is none)."""
    found = _checkpoints(directory)
    return found[-1] if found else None


def _checkpoints(directory: str) -> list:
    """Paths of the finished checkpoints in `directory`, oldest step first."""
    if not os.path.isdir(directory):
        return []
    return [os.path.join(directory, f) for f in sorted(os.listdir(directory)) if re.fullmatch(r"ckpt-\d{8}\.npz", f)]
