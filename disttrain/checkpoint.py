"""Atomic, pickle-free, checksummed checkpoints.

A checkpoint is one .npz file of named arrays plus a JSON metadata record (step, configuration,
...) and a SHA-256 over the metadata and every array. It is written to a temporary file in the same
directory, fsync'ed, then renamed over the final name (an atomic replace on POSIX), and the directory
entry is fsync'ed: a crash at any moment leaves either the previous checkpoint or the new one, never a
torn file. Loading uses ``allow_pickle=False`` and refuses a file whose checksum does not match.

Robustness rules (issue 14 / 10):

- Temporary names are ``ckpt-NNNNNNNN.npz.tmp-<host>-<pid>-<random>``: unique across hosts that
  share the directory. A failed write (full disk, read-only directory, ...) removes its temporary
  file before the error propagates. Stale temporary files of dead writers are removed: on this host
  when their process no longer exists, from another host only when older than `STALE_TMP_SECONDS`
  (we cannot see its processes, so age is the only safe evidence).
- Newly created directories and the directory holding the checkpoint are fsync'ed so the entries
  themselves survive a power cut.
- Only regular files are checkpoint candidates: a FIFO, socket or directory named like a
  checkpoint is reported and skipped. Opening uses O_NONBLOCK and checks the opened descriptor, so a
  FIFO swapped in after the listing still cannot block the reader.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import stat
import time

import numpy as np

from . import faults

_META = "__meta__"
_NAME = re.compile(r"ckpt-\d{8}\.npz")
# new format: <final>.tmp-<host>-<pid>-<8 hex>; legacy format (before hosts were recorded): <final>.tmp-<pid>
_TMP = re.compile(r"ckpt-\d{8}\.npz\.tmp-(?:(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}|(?P<legacy_pid>\d+))")
STALE_TMP_SECONDS = 3600.0  # another host's temporary file older than this is a dead writer's


def _digest(arrays: dict, meta: dict) -> str:
    """SHA-256 over the metadata (canonical JSON) and every array's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _host() -> str:
    # '/' would make the temp name a path; keep the name one directory entry
    return socket.gethostname().replace("/", "_") or "unknown-host"


def _fsync_dir(d: str) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(d: str) -> None:
    """os.makedirs, then fsync the parent of every directory it created (a new directory entry
    is only durable once its parent directory is synced)."""
    missing = []
    p = d
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    os.makedirs(d, exist_ok=True)
    for p in reversed(missing):
        _fsync_dir(os.path.dirname(p))


def save(path: str, arrays: dict, meta: dict) -> None:
    """Write `arrays` (name -> ndarray) and `meta` (JSON-serialisable) atomically to `path`.

    Raises OSError when the write fails (full disk, read-only or missing permissions, a directory in
    the way, ...); the temporary file is removed first, so a failure leaves the directory as it was.
    """
    d = os.path.dirname(os.path.abspath(path))
    _makedirs_durable(d)
    safe = {k.replace("/", "::"): np.ascontiguousarray(v) for k, v in arrays.items()}
    record = dict(meta, sha256=_digest(safe, meta))
    _remove_stale_tmp(d)
    tmp = f"{path}.tmp-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
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
    _fsync_dir(d)


def _remove_stale_tmp(directory: str, now: float | None = None) -> None:
    """Delete temporary files of writers that died mid-write: on this host when their process no
    longer exists; from another host (or of unknown host: legacy names) only when older than
    STALE_TMP_SECONDS, since another host's processes cannot be checked from here."""
    now = time.time() if now is None else now
    here = _host()
    for f in os.listdir(directory):
        m = _TMP.fullmatch(f)
        if not m:
            continue
        full = os.path.join(directory, f)
        try:
            if m["host"] == here:
                pid = int(m["pid"])
                if pid == os.getpid():
                    continue
                try:
                    os.kill(pid, 0)
                    continue  # its writer is alive
                except ProcessLookupError:
                    pass
                except PermissionError:
                    continue  # someone else's live process
            elif now - os.lstat(full).st_mtime < STALE_TMP_SECONDS:
                continue
            os.remove(full)
        except FileNotFoundError:
            pass  # another cleaner got there first


def _open_regular(path: str):
    """A binary file object for `path`, or ValueError if it is not a regular file. O_NONBLOCK: a
    FIFO opened for reading would otherwise block until a writer appears - forever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ValueError(f"checkpoint {path} is unreadable: {e}") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ValueError(f"checkpoint {path} is not a regular file (mode {stat.filemode(st.st_mode)})")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def load(path: str) -> tuple[dict, dict]:
    """(arrays, meta) from `path`; ValueError if the file is not a regular file, is corrupt or its
    checksum does not match."""
    with _open_regular(path) as fh:
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


def path_for(directory: str, step: int) -> str:
    return os.path.join(directory, f"ckpt-{step:08d}.npz")


def latest_valid(directory: str, warn=print) -> tuple[str | None, dict, dict]:
    """(path, arrays, meta) of the newest checkpoint that loads and passes its checksum, newest
    first; each corrupt, unreadable or non-regular one is reported through `warn` and skipped, so a
    torn or damaged newest file costs one checkpoint interval, never the run. (None, {}, {}) if none."""
    for path in reversed(_checkpoints(directory, warn)):
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


def _checkpoints(directory: str, warn=None) -> list:
    """Paths of the finished checkpoints in `directory`, oldest step first: regular files named
    ckpt-NNNNNNNN.npz. Anything else with such a name (FIFO, socket, directory, dangling link) is
    reported through `warn` and skipped - opening a FIFO would block forever."""
    if not os.path.isdir(directory):
        return []
    out = []
    for f in sorted(os.listdir(directory)):
        if not _NAME.fullmatch(f):
            continue
        p = os.path.join(directory, f)
        try:
            mode = os.stat(p).st_mode  # stat never blocks, even on a FIFO
        except OSError as e:
            if warn:
                warn(f"[disttrain] skipping checkpoint {p}: {e}")
            continue
        if stat.S_ISREG(mode):
            out.append(p)
        elif warn:
            warn(f"[disttrain] skipping checkpoint {p}: not a regular file (mode {stat.filemode(mode)})")
    return out
