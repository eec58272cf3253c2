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

When the timeline is off, ``span`` returns one shared no-op object: the cost is a global lookup.
If ``stop`` is never called (a crash), each rank writes ``<path>.rank<r>.json`` at exit; merge them
with ``python -m disttrain.timeline merge OUT IN...``.
"""
from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time

_on = False
_events: list = []
_origin = 0.0
_path = ""
_rank = 0
_threads: dict = {}


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
        _events.append(ev)  # list.append is atomic under the GIL: no lock between threads
        return False


def _tid() -> int:
    tid = threading.get_native_id()
    if tid not in _threads:
        _threads[tid] = threading.current_thread().name
    return tid


def enabled() -> bool:
    return _on


def span(name: str, cat: str = "compute", **args):
    """Context manager recording a complete event (no-op while the timeline is off)."""
    return _Span(name, cat, args) if _on else NULL


def instant(name: str, cat: str = "mark", **args) -> None:
    if _on:
        _events.append({"name": name, "cat": cat, "ph": "i", "s": "t", "ts": (time.perf_counter() - _origin) * 1e6,
                        "pid": _rank, "tid": _tid(), "args": args})


def start(path: str, group=None) -> None:
    """Begin recording on every rank of the world (collective: aligns the clocks with a barrier)."""
    global _on, _origin, _path, _rank
    from .runtime import init, world

    init()
    w = world()
    _rank, _path = w.rank, path
    _events.clear()
    w.comm.Barrier()
    _origin = time.perf_counter()
    _on = True
    atexit.register(_flush_own)


def _metadata(rank: int, threads: dict) -> list:
    out = [{"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}},
           {"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}}]
    out += [{"name": "thread_name", "ph": "M", "pid": rank, "tid": t, "args": {"name": n}} for t, n in threads.items()]
    return out


def stop() -> str | None:
    """Stop recording; gather every rank's events to rank 0, which writes the file (returns its path)."""
    global _on
    if not _on:
        return None
    from .runtime import world

    _on = False
    mine = _metadata(_rank, dict(_threads)) + list(_events)
    _events.clear()
    parts = world().comm.gather(mine, root=0)  # pickled: a control-sized message, once per run
    if _rank != 0:
        return None
    _write(_path, [e for part in parts for e in part])
    return _path


def _write(path: str, events: list) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
    os.replace(tmp, path)


def _flush_own() -> None:
    """At exit without stop(): keep this rank's events in its own file (mergeable)."""
    if _on and _events:
        root, ext = os.path.splitext(_path)
        _write(f"{root}.rank{_rank}{ext or '.json'}", _metadata(_rank, dict(_threads)) + list(_events))


def merge(out: str, inputs: list) -> int:
    """Concatenate the events of several trace files into one; returns the number of events."""
    events = []
    for p in inputs:
        with open(p) as f:
            events += json.load(f)["traceEvents"]
    _write(out, events)
    return len(events)


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
