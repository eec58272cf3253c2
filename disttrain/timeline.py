"""Timeline: a Chrome-trace / Perfetto JSON of what every rank did and when.

    dt.timeline.start("trace.json")   # or DISTTRAIN_TIMELINE=trace.json, or --timeline in the main job
    ...train...
    dt.timeline.stop()                # collective: rank 0 writes one file with every rank's events

Open the file in https://ui.perfetto.dev or chrome://tracing: one process per rank, one track per
thread - "main" (forward/backward per layer, optimizer step, waits) and "disttrain-comm" (each
asynchronous collective, its algorithm and phases) - so the overlap of bucket allreduces with
backward is visible directly. Events are "complete" events (ph "X", microseconds) plus instants
(bucket ready). Clocks: every rank measures from the same barrier, so tracks line up to within the
barrier's skew (microseconds on one host).

Streamed, in bounded memory: a run records about 8 KB of events per step per rank, so keeping
them all until ``stop`` grew without bound. Each rank appends its events to its own file,
``<path>.rank<r>.json``, through a buffer of at most ``BUFFER_EVENTS`` events that is written out
when full, at least every ``FLUSH_SECONDS`` and at ``stop``/exit. The per-rank file is in the
trace format's JSON *array* form, one event per line, whose closing bracket is optional (the
format allows that precisely for traces of processes that died), so it opens on its own and a
crash loses at most the unflushed buffer. ``stop`` streams every rank's file to rank 0 over MPI
(no shared file system needed), which writes the one merged JSON and then the per-rank files are
deleted. If ``stop`` never runs they remain: ``python -m disttrain.timeline merge OUT IN...``.

When the timeline is off, ``span`` returns one shared no-op object: the cost is a global lookup.
"""
from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time

from . import groups

#: the in-memory buffer's cap (events; about 200 bytes each) and the longest time between writes
BUFFER_EVENTS = 2048
FLUSH_SECONDS = 2.0
_CHUNK = 1 << 20  # bytes per message when stop() streams a rank's file to rank 0
_TAG = 0x71E      # the tag of those messages

_on = False
_buf: list = []            # events not yet written to this rank's file
_lock = threading.Lock()   # guards _buf: the main thread and the communication thread both record
_io = threading.Lock()     # keeps writes to the file in order
_file = None               # this rank's stream file (text, line per event)
_own = ""                  # its path
_next_flush = 0.0          # perf_counter time of the next periodic write
_origin = 0.0
_path = ""
_rank = 0
_threads: dict = {}
_atexit = False
#: (what, local error or None) -> None: the cross-rank check start() and stop() begin with, installed by the runtime
#: (comm/validate.py sits above this module): a rank that calls either alone meets its peers' next
#: collective there and every rank raises CollectiveError, instead of waiting in the world barrier
#: for good (attack9)
agree = None


def install(check) -> None:
    """Called once by the runtime: how start() and stop() agree with the other ranks."""
    global agree
    agree = check


class _Null:
    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


NULL = _Null()


class _Span:
    __slots__ = ("name", "cat", "args", "t0")

    def __init__(self, name, cat, args):
        self.name, self.cat, self.args = name, cat, args

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        t1 = time.perf_counter()
        ev = {"name": self.name, "cat": self.cat, "ph": "X", "ts": (self.t0 - _origin) * 1e6,
              "dur": (t1 - self.t0) * 1e6, "pid": _rank, "tid": _tid()}
        if self.args:
            ev["args"] = self.args
        _record(ev, t1)
        return False


def _record(ev: dict, now: float) -> None:
    """Buffer one event; write the buffer out when it is full or the last write is old."""
    with _lock:  # a bare append could land in a list another thread has just taken to write
        _buf.append(ev)
        full = len(_buf) >= BUFFER_EVENTS or now >= _next_flush
    if full:
        _flush()


def _flush() -> None:
    """Write the buffered events to this rank's file (any thread)."""
    global _buf, _next_flush
    with _io:
        with _lock:
            events, _buf = _buf, []
            _next_flush = time.perf_counter() + FLUSH_SECONDS
        if _file is not None and events:
            _file.write("".join(json.dumps(e) + ",\n" for e in events))
            _file.flush()  # to the OS: a killed process loses nothing already written


def _tid() -> int:
    tid = threading.get_native_id()
    if tid not in _threads:
        name = _threads[tid] = threading.current_thread().name
        _record(_thread_meta(_rank, tid, name), 0.0)
    return tid


def enabled() -> bool:
    return _on


def span(name: str, cat: str = "compute", **args):
    """Context manager recording a complete event (no-op while the timeline is off)."""
    return _Span(name, cat, args) if _on else NULL


def instant(name: str, cat: str = "mark", **args) -> None:
    if _on:
        now = time.perf_counter()
        _record({"name": name, "cat": cat, "ph": "i", "s": "t", "ts": (now - _origin) * 1e6,
                 "pid": _rank, "tid": _tid(), "args": args}, now)


def start(path: str, group=None) -> None:
    """Begin recording on every rank of the world (collective: aligns the clocks with a barrier).

    Each rank streams its events to ``<path>.rank<r>.json`` (see the module doc)."""
    global _on, _origin, _path, _rank, _file, _own, _next_flush
    w = groups.world()
    own, err = rank_file(path, w.rank), None
    try:  # a directory one host cannot write is an error on every rank, not a rank missing the barrier
        os.makedirs(os.path.dirname(os.path.abspath(own)), exist_ok=True)
        if not os.access(os.path.dirname(os.path.abspath(own)), os.W_OK):
            err = f"timeline.start: cannot write {own} (directory not writable)"
    except OSError as e:
        err = f"timeline.start: cannot write {own}: {e}"
    if agree is not None:
        agree("timeline.start", err)
    elif err:
        raise OSError(err)
    if _on:  # started twice: close the previous stream, which stays as a per-rank file
        _close_own()
    _rank, _path, _own = w.rank, path, own
    _file = open(_own, "w")
    _file.write("[\n")
    _buf.clear()
    _threads.clear()
    for ev in _metadata(_rank, {}):
        _buf.append(ev)
    w.comm.Barrier()
    _origin = time.perf_counter()
    _next_flush = _origin + FLUSH_SECONDS
    _on = True
    global _atexit
    if not _atexit:
        atexit.register(_close_own)
        _atexit = True


def rank_file(path: str, rank: int) -> str:
    """Where rank `rank` streams its events for the trace `path`."""
    root, ext = os.path.splitext(path)
    return f"{root}.rank{rank}{ext or '.json'}"


def _thread_meta(rank: int, tid: int, name: str) -> dict:
    return {"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": name}}


def _metadata(rank: int, threads: dict) -> list:
    out = [{"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}},
           {"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}}]
    out += [_thread_meta(rank, t, n) for t, n in threads.items()]
    return out


def _close_own() -> None:
    """Write what is buffered and close this rank's file (at stop, and at exit without stop: the
    file then stays, mergeable)."""
    global _on, _file
    _on = False
    _flush()
    with _io:
        if _file is not None:
            _file.close()
            _file = None


def stop() -> str | None:
    """Stop recording (collective over the world): every rank's stream goes to rank 0, which writes
    the one trace file; the per-rank files are then deleted. Returns the path on rank 0."""
    if not _on:
        return None
    if agree is not None:
        agree("timeline.stop", None)
    _close_own()
    comm = groups.world().comm
    if _rank != 0:
        for chunk in _chunks(_own):
            comm.send(chunk, dest=0, tag=_TAG)  # bounded messages, control-sized
        comm.send(None, dest=0, tag=_TAG)
    else:
        def every_rank():
            yield from _read_lines(_own)
            for r in range(1, comm.Get_size()):
                while (chunk := comm.recv(source=r, tag=_TAG)) is not None:
                    yield from chunk.decode().splitlines()

        _write_lines(_path, every_rank())
    comm.Barrier()  # the merged file exists before any per-rank file goes
    os.remove(_own)
    return _path if _rank == 0 else None


def _chunks(path: str):
    """The file's complete lines, in pieces of about _CHUNK bytes."""
    piece, size = [], 0
    with open(path, "rb") as f:
        for line in f:
            piece.append(line)
            size += len(line)
            if size >= _CHUNK:
                yield b"".join(piece)
                piece, size = [], 0
    if piece:
        yield b"".join(piece)


def _read_lines(path: str):
    with open(path) as f:
        yield from f


def _events_of(lines):
    """The JSON text of each event in a stream file's lines ("[", one event per line with a
    trailing comma, maybe no "]"); a line cut short by a crash is dropped."""
    for line in lines:
        line = line.strip().rstrip(",")
        if not line or line in ("[", "]"):
            continue
        try:
            json.loads(line)
        except ValueError:
            continue
        yield line


def _write_lines(path: str, lines) -> int:
    """Write the merged trace from stream-file lines, atomically; returns the number of events."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    n = 0
    with open(tmp, "w") as f:
        f.write('{"traceEvents": [\n')
        for ev in _events_of(lines):
            f.write(",\n" + ev if n else ev)
            n += 1
        f.write('\n], "displayTimeUnit": "ms"}\n')
    os.replace(tmp, path)
    return n


def merge(out: str, inputs: list) -> int:
    """Merge trace files - per-rank stream files (even of a crashed run) or whole trace files -
    into one; returns the number of events."""
    def lines():
        for p in inputs:
            with open(p) as f:
                head = f.read(1 << 12).lstrip()
            if head.startswith("{"):  # a whole trace file (e.g. an earlier merge)
                with open(p) as f:
                    yield from (json.dumps(e) for e in json.load(f)["traceEvents"])
            else:
                yield from _read_lines(p)

    return _write_lines(out, lines())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3 or argv[0] != "merge":
        print("usage: python -m disttrain.timeline merge OUT.json IN.json [IN.json ...]", file=sys.stderr)
        return 2
    n = merge(argv[1], argv[2:])
    print(f"wrote {argv[1]} ({n} events from {len(argv) - 2} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
