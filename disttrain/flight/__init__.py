"""Flight recorder: every rank's last N collectives and point-to-point operations, and a reader
that says what went wrong.

Each operation disttrain issues (blocking and asynchronous collectives, DataParallel buckets,
pipeline sends and receives) is one record in a per-rank ring buffer (``collections.deque`` with
``maxlen``; appending is O(1) and never allocates beyond the bound): name, group and the call's
sequence number on that group, world ranks of the group, shape, dtype, algorithm, call site,
enqueue / start / end times (``time.monotonic``) and state (queued, running, done, error, refused).
This is what PyTorch's NCCL flight recorder keeps, and what a hang needs: the n-th collective of
each group on every rank, so the rank that never arrived and the call where ranks diverged can be
named without attaching a debugger to N processes.

On a stall report, a signal, an abort, or ``dt.dump_flight_record(path)`` every rank writes its
buffer to ``<dir>/flight-rank<r>.json``; ``python -m disttrain.flight DIR`` reads them all and
prints one paragraph of diagnosis.

Environment: ``DISTTRAIN_FLIGHT_RECORDS`` (default 2000; 0 = off), ``DISTTRAIN_FLIGHT_DIR``
(where automatic dumps go; default ``./disttrain-flight``).
"""
from __future__ import annotations

import collections
import json
import os
import socket
import sys
import time

from .. import groups

# The ring: stall._Op appends each operation once, at issue (inlined there: it is on every call).
_buf: collections.deque = collections.deque(maxlen=int(os.environ.get("DISTTRAIN_FLIGHT_RECORDS", "2000")) or 1)
_on = os.environ.get("DISTTRAIN_FLIGHT_RECORDS", "2000") != "0"
_dumped = False


def records() -> list:
    """This rank's records, oldest first, as dicts."""
    return [op.as_dict() for op in list(_buf)]


def _rank() -> int:
    w = groups.current()
    return w.rank if w is not None else int(os.environ.get("PMI_RANK", "0"))


def dump(path: str | None = None) -> str:
    """Write this rank's flight record to ``<path>/flight-rank<r>.json`` (local: no communication,
    so it works while other ranks hang). Returns the file written."""
    d = path or os.environ.get("DISTTRAIN_FLIGHT_DIR") or "disttrain-flight"
    os.makedirs(d, exist_ok=True)
    r = _rank()
    out = os.path.join(d, f"flight-rank{r}.json")
    doc = {"rank": r, "host": socket.gethostname(), "pid": os.getpid(), "now": time.monotonic(),
           "wall": time.time(), "records": records()}
    tmp = f"{out}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, out)
    return out


def dump_on_failure() -> None:
    """Dump once per process when something went wrong (stall, signal, abort); never raises."""
    global _dumped
    if _dumped or not _on:
        return
    _dumped = True
    try:
        out = dump()
        sys.stderr.write(f"[disttrain] flight record written to {out} (python -m disttrain.flight "
                         f"{os.path.dirname(out)})\n")
    except Exception as e:  # noqa: BLE001 - diagnostics must not mask the failure itself
        sys.stderr.write(f"[disttrain] could not write the flight record: {e}\n")


def dump_flight_record(path: str | None = None) -> str:
    """Public API: every rank that calls it writes its recent collectives to `path` (a directory).

    Not collective - call it on every rank (e.g. from an exception handler) and then read the
    directory with ``python -m disttrain.flight DIR``.

    Example:
        >>> dt.dump_flight_record("flight")   # on every rank; then: python -m disttrain.flight flight
    """
    return dump(path)


# --------------------------------------------------------------------------------- analysis
def load(directory: str) -> dict:
    """rank -> dump document, for every flight-rank*.json in `directory`."""
    out = {}
    for f in sorted(os.listdir(directory)):
        if f.startswith("flight-rank") and f.endswith(".json"):
            with open(os.path.join(directory, f)) as fh:
                doc = json.load(fh)
            out[int(doc["rank"])] = doc
    return out


_SAME_SHAPE = ("allreduce", "broadcast", "reduce_scatter")  # collectives whose shape must agree


def _sig(r: dict) -> tuple:
    name = r["name"].replace(" (async)", "")
    shape = r["shape"] if name in _SAME_SHAPE else (r["shape"] or [None])[1:]  # first dims may differ
    return (name, None if shape is None else tuple(shape), r["dtype"])


def diagnose(docs: dict) -> str:
    """One paragraph: which rank never arrived, where ranks disagree, who is the straggler."""
    if not docs:
        return "no flight records found"
    ranks = sorted(docs)
    world = max(max(ranks), max((max(r["ranks"]) for d in docs.values() for r in d["records"] if r["ranks"]),
                                default=0)) + 1
    missing_files = [r for r in range(world) if r not in docs]
    by_group: dict = {}  # group -> rank -> {seq: record}
    for rank, d in docs.items():
        for rec in d["records"]:
            if rec["group"]:
                by_group.setdefault(rec["group"], {}).setdefault(rank, {})[rec["seq"]] = rec
    findings = []
    for g, per_rank in sorted(by_group.items()):
        members = next(iter(per_rank.values()))
        members = next(iter(members.values()))["ranks"]
        have = {r: per_rank.get(r, {}) for r in members if r in docs}
        last = {r: max(s) if s else 0 for r, s in have.items()}
        if not last:
            continue
        # the first call number where ranks disagree on what they called
        common = set.intersection(*[set(s) for s in have.values()]) if have else set()
        for seq in sorted(common):
            if any(have[r][seq]["state"] not in ("done", "running", "queued", "validating") for r in have):
                continue  # a call that raised on some rank (an agreed error): not a divergence
            sigs = {r: _sig(have[r][seq]) for r in have}
            if len(set(sigs.values())) > 1:
                parts = "; ".join(f"rank {r}: {have[r][seq]['name']} {have[r][seq]['shape']} {have[r][seq]['dtype']} "
                                  f"at {have[r][seq]['site']}" for r in sorted(have))
                findings.append(f"ranks disagree on collective #{seq} of group {g}: {parts}.")
                break
        top = max(last.values())
        stuck = [r for r in have if last[r] == top and have[r][top]["state"] in ("running", "queued", "validating")]
        behind = [r for r in have if last[r] < top]
        if stuck and behind:
            rec = have[stuck[0]][top]
            where = "; ".join(f"rank {r} last issued #{last[r]}" + (f" ({have[r][last[r]]['name']} at "
                                                                    f"{have[r][last[r]]['site']})" if last[r] else "")
                              for r in sorted(behind))
            findings.append(f"rank(s) {sorted(stuck)} wait in {rec['name']} #{top} of group {g} (called at "
                            f"{rec['site']}) that rank(s) {sorted(behind)} never reached: {where}.")
        if stuck and behind or missing_files:
            continue  # a rank that never came (or left) is the finding; arrival order means nothing then
        # straggler: among completed common calls, who arrives last most often
        late: dict = {}
        for seq in sorted(common)[-50:]:
            starts = {r: have[r][seq]["start"] - docs[r]["now"] + docs[r]["wall"] for r in have}
            if len(starts) > 1:
                slow = max(starts, key=starts.get)
                late[slow] = late.get(slow, 0) + 1
        if late and len(have) > 1:
            slow, n = max(late.items(), key=lambda kv: kv[1])
            if n >= max(3, 0.6 * sum(late.values())):
                findings.append(f"rank {slow} arrived last in {n} of the last {sum(late.values())} collectives of "
                                f"group {g}: the straggler.")
    if missing_files:
        findings.insert(0, f"no flight record from rank(s) {missing_files} (the process died, was killed, or did "
                           "not reach the dump).")
    if not findings:
        return f"{len(docs)} rank(s), {sum(len(d['records']) for d in docs.values())} records: every group's ranks " \
               "issued the same collectives and none is waiting."
    return " ".join(findings)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m disttrain.flight DIR   (DIR holds flight-rank<r>.json files)", file=sys.stderr)
        return 2
    try:
        docs = load(argv[0])
    except FileNotFoundError:
        print(f"disttrain.flight: no such directory: {argv[0]}", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError) as e:  # a file cut short by a kill, or not a flight record
        print(f"disttrain.flight: cannot read the flight records in {argv[0]}: {type(e).__name__}: {e}",
              file=sys.stderr)
        return 2
    print(diagnose(docs))
    return 0
