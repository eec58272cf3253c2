"""The single-file format: one atomic, pickle-free, checksummed .npz of named arrays.

What ``python -m disttrain.checkpoint convert DIR --to single OUT.npz`` writes (a consolidated
checkpoint for export and inspection), and the format of the main job's checkpoints before they
became directories (``ckpt-NNNNNNNN.npz``; resuming from those is refused with a message).

The file holds the arrays plus a JSON metadata record and a SHA-256 over the metadata and every
array. It is written to a temporary file in the same directory (``files.tmp_suffix``: unique
across hosts), fsync'ed, then renamed over the final name (an atomic replace on POSIX), and the
directory entry is fsync'ed: a crash leaves either the previous file or the new one, never a torn
one. A failed write removes its temporary file; stale temporaries of dead writers are removed by
the rules of ``files.remove_stale``. Loading uses ``allow_pickle=False``, opens only regular files
without blocking (``files.open_regular``) and refuses a file whose checksum does not match.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

from .. import faults
from . import files

_META = "__meta__"
# new format: <final>.tmp-<host>-<pid>-<8 hex>; legacy format (before hosts were recorded): <final>.tmp-<pid>
_TMP = re.compile(r".+?\.npz\.tmp-(?:(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}|(?P<legacy_pid>\d+))")


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
    """Write `arrays` (name -> ndarray) and `meta` (JSON-serialisable) atomically to `path`.

    Raises OSError when the write fails (full disk, read-only or missing permissions, a directory in
    the way, ...); the temporary file is removed first, so a failure leaves the directory as it was.
    """
    d = os.path.dirname(os.path.abspath(path))
    files.makedirs_durable(d)
    safe = {k.replace("/", "::"): np.ascontiguousarray(v) for k, v in arrays.items()}
    record = dict(meta, sha256=_digest(safe, meta))
    _remove_stale_tmp(d)
    tmp = path + files.tmp_suffix()
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **safe, **{_META: np.frombuffer(json.dumps(record).encode(), np.uint8)})
            f.flush()
            os.fsync(f.fileno())
        faults.point("checkpoint-write")  # tests: die between the write and the rename
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        except OSError:  # e.g. the directory became unwritable: the stale-file cleanup gets it later
            pass
        raise
    files.fsync_dir(d)


def _remove_stale_tmp(directory: str, now: float | None = None) -> None:
    files.remove_stale(directory, _TMP, now)


def load(path: str) -> tuple[dict, dict]:
    """(arrays, meta) from `path`; ValueError if the file is not a regular file, is corrupt or its
    checksum does not match."""
    with files.open_regular(path) as fh:
        try:
            with np.load(fh, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files if k != _META}
                meta = json.loads(bytes(z[_META]).decode())
        except Exception as e:  # noqa: BLE001 - zip, npy and JSON layers each raise their own types
            raise ValueError(f"checkpoint {path} is unreadable or corrupt: {type(e).__name__}: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"checkpoint {path} is corrupt: its metadata is not a JSON object")
    want = meta.pop("sha256", None)
    if want != _digest(arrays, meta):
        raise ValueError(f"checkpoint {path} failed its checksum: the file is corrupt")
    return {k.replace("::", "/"): v for k, v in arrays.items()}, meta
