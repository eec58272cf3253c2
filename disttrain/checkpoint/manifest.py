"""The checkpoint directory format: names, the manifest, its checksum, and finding checkpoints.

    <checkpoint dir>/step-00000100/      one checkpoint (renamed into place whole)
        manifest.json                    written last: what every file holds, checksums, metadata
        rank-00000.bin ...               each rank's shards: raw C-order arrays back to back

Manifest fields (JSON, pickle-free): ``format``/``version``; ``step``; ``world_size`` and
``layout`` it was written under (mesh, sharding, ...); ``arrays`` {global name: {shape, dtype}};
``entries`` [{name, file, offset, shape (as stored), box, flat, dtype, sha256}] - which region of
which global array each byte range holds; ``files`` {file: {bytes, sha256, rank}}; ``optimizer``,
``schedule``, ``compressor``, ``extra`` (user metadata), ``per_rank`` (each writer rank's small
JSON state); ``sha256`` over all of the above (canonical JSON).

A file's checksum is the SHA-256 of its entries' digests in order and its size: verified whole by
``python -m disttrain.checkpoint verify``, while a loading rank verifies exactly the entries it
reads (each entry's own SHA-256) - so no rank reads more than what overlaps its regions.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time

from . import files

FORMAT, VERSION = "disttrain-checkpoint", 1
MANIFEST = "manifest.json"
NAME = re.compile(r"step-(\d{8})")
# temporaries of the writer (the checkpoint being written) and of a replaced checkpoint (moved aside)
TMP = re.compile(r"step-\d{8}\.(?:tmp|old)-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}")
# a checkpoint moved aside while the same step was written again (see orphans)
OLD = re.compile(r"(?P<final>step-\d{8})\.old-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}")
LEGACY = re.compile(r"ckpt-\d{8}\.npz")  # the single-file checkpoints of earlier versions
ALIGN = 64  # entries start at multiples of this offset: aligned memory maps for every dtype


class CheckpointError(ValueError):
    """A checkpoint cannot be written or loaded; raised with the same message on every rank."""


class CorruptCheckpoint(CheckpointError):
    """The checkpoint is damaged (a file missing, unreadable, truncated or failing its checksum):
    a reader of a checkpoint directory falls back to the previous valid checkpoint."""


def dir_for(directory: str, step: int) -> str:
    return os.path.join(directory, f"step-{step:08d}")


def shard_file(rank: int) -> str:
    return f"rank-{rank:05d}.bin"


def digest(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def file_digest(entry_digests: list, size: int) -> str:
    h = hashlib.sha256(str(size).encode())
    for d in entry_digests:
        h.update(bytes.fromhex(d))
    return h.hexdigest()


def write(path: str, record: dict) -> None:
    """Write the manifest (with its checksum) to `path`, fsync'ed."""
    body = dict(record, sha256=digest(record))
    files.write_durable(path, [json.dumps(body, indent=1, sort_keys=True).encode()])


def read(ckpt: str) -> dict:
    """The verified manifest of checkpoint directory `ckpt`; CorruptCheckpoint if it is missing,
    not a regular file, not JSON, of another format, or fails its checksum."""
    path = os.path.join(ckpt, MANIFEST)
    try:
        with files.open_regular(path) as f:
            record = json.loads(f.read().decode())
    except ValueError as e:  # unreadable, not regular, not UTF-8 / JSON (all ValueErrors)
        raise CorruptCheckpoint(f"checkpoint {ckpt}: manifest unreadable or corrupt: {e}") from e
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CorruptCheckpoint(f"checkpoint {ckpt}: {MANIFEST} is not a {FORMAT} manifest")
    want = record.pop("sha256", None)
    if want != digest(record):
        raise CorruptCheckpoint(f"checkpoint {ckpt}: the manifest failed its checksum (corrupt)")
    if record.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {ckpt}: format version {record.get('version')} is not {VERSION}")
    return record


def candidates(directory: str, warn=None) -> list:
    """Checkpoint directories (step-NNNNNNNN, and orphans standing in for a missing one) in
    `directory`, newest step first. Anything else with such a name (a FIFO, a file, a dangling
    link) is reported through `warn` and skipped."""
    if not os.path.isdir(directory):
        return []
    out = []
    names = sorted(os.listdir(directory) + [final for final, _ in orphans(directory)], reverse=True)
    stand_in = dict(orphans(directory))
    for f in names:
        if f in stand_in:
            out.append(stand_in[f])
            continue
        if not NAME.fullmatch(f):
            continue
        p = os.path.join(directory, f)
        try:
            mode = os.stat(p).st_mode  # stat never blocks, even on a FIFO
        except OSError as e:
            if warn:
                warn(f"[disttrain] skipping checkpoint {p}: {e}")
            continue
        if stat.S_ISDIR(mode):
            out.append(p)
        elif warn:
            warn(f"[disttrain] skipping checkpoint {p}: not a directory (mode {stat.filemode(mode)})")
    return out


def legacy_files(directory: str) -> list:
    """Single-file checkpoints of earlier versions in `directory` (refused with a message)."""
    return sorted(f for f in os.listdir(directory) if LEGACY.fullmatch(f)) if os.path.isdir(directory) else []


def is_checkpoint(path: str) -> bool:
    """Whether `path` itself is one checkpoint directory (it holds a manifest entry)."""
    return os.path.lexists(os.path.join(path, MANIFEST))


def orphans(directory: str, dead_only: bool = False) -> list:
    """Complete checkpoints moved aside (``step-N.old-...``) whose ``step-N`` is missing: the
    writer of the same step died between its two renames (writer._publish). They are valid
    checkpoints - readers list them (`candidates`), and the next writer renames them back
    (`dead_only`: only those whose writer is dead, so a live writer's rename is never raced)."""
    if not os.path.isdir(directory):
        return []
    now, out = time.time(), []
    for f in os.listdir(directory):
        m = OLD.fullmatch(f)
        p = os.path.join(directory, f)
        try:
            if m and not os.path.lexists(os.path.join(directory, m["final"])) and is_checkpoint(p) \
                    and (not dead_only or files.writer_dead(m, p, now)):
                out.append((m["final"], p))
        except FileNotFoundError:
            pass
    return sorted(out)
