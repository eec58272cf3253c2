"""File-system rules every checkpoint writer and reader keeps (issue 14 / 10).

- Temporary names carry ``<host>-<pid>-<8 hex>``: unique across hosts that share the directory.
- Stale temporaries of dead writers are removed: on this host when their process no longer
  exists, from another host only when older than `STALE_TMP_SECONDS` (we cannot see its
  processes, so age is the only safe evidence).
- Newly created directories, written files and the directory holding a renamed entry are fsync'ed,
  so the entries themselves survive a power cut.
- Only regular files are opened, with O_NONBLOCK and a check of the opened descriptor: a FIFO
  named like a checkpoint (or swapped in after a listing) can never block a reader.
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import stat
import time

STALE_TMP_SECONDS = 3600.0  # another host's temporary older than this is a dead writer's


def host() -> str:
    # '/' would make the temp name a path; keep the name one directory entry
    return socket.gethostname().replace("/", "_") or "unknown-host"


def tmp_suffix(kind: str = "tmp") -> str:
    """``.<kind>-<host>-<pid>-<8 hex>``: distinct for every writer, even the same process twice."""
    return f".{kind}-{host()}-{os.getpid()}-{secrets.token_hex(4)}"


def fsync_dir(d: str) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(d: str) -> None:
    """os.makedirs, then fsync the parent of every directory it created (a new directory entry
    is only durable once its parent directory is synced). `d` may be relative ("ck"): its
    parent is then the working directory, not the empty name."""
    d = os.path.abspath(d)
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
        fsync_dir(os.path.dirname(p))


def write_durable(path: str, chunks) -> int:
    """Write the byte chunks to a new file at `path` and fsync it; returns the byte count."""
    n = 0
    with open(path, "xb") as f:
        for c in chunks:
            f.write(c)
            n += len(c)
        f.flush()
        os.fsync(f.fileno())
    return n


def remove_quietly(path: str) -> None:
    """Remove a file or a directory tree; a failure is left to the stale-temporary clean-up."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except OSError:
        pass


def writer_dead(m, full: str, now: float) -> bool:
    """Whether the writer named in a temporary's name (match `m` with groups ``host`` and ``pid``)
    is dead: on this host when its process no longer exists (never this process); from another
    host only when the entry is older than STALE_TMP_SECONDS. FileNotFoundError if it is gone."""
    if m["host"] == host():
        pid = int(m["pid"])
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
            return False  # its writer is alive
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # someone else's live process
    return now - os.lstat(full).st_mtime >= STALE_TMP_SECONDS


def remove_stale(directory: str, pattern, now: float | None = None) -> None:
    """Delete the entries of `directory` whose names match `pattern` (a compiled regex with groups
    ``host`` and ``pid``, optionally ``legacy_pid``) and whose writer is dead: on this host when its
    process no longer exists; from another host (or of unknown host) only when older than
    STALE_TMP_SECONDS."""
    now = time.time() if now is None else now
    for f in os.listdir(directory):
        m = pattern.fullmatch(f)
        if not m:
            continue
        full = os.path.join(directory, f)
        try:
            if not writer_dead(m, full, now):
                continue
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.remove(full)
        except FileNotFoundError:
            pass  # another cleaner got there first


def open_regular(path: str):
    """A binary file object for `path`, or ValueError if it is missing, unreadable or not a regular
    file. O_NONBLOCK: a FIFO opened for reading would otherwise block until a writer appears."""
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
