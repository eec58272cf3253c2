"""The checkpoint command line (one process, no MPI needed).

    python -m disttrain.checkpoint inspect DIR [--json]      the manifest, readably (DIR: one checkpoint,
                                                            or a directory of them: the newest)
    python -m disttrain.checkpoint verify DIR                every entry's and file's checksum
    python -m disttrain.checkpoint convert DIR --to single OUT.npz
                                                            every global array assembled into one
                                                            checksummed .npz (checkpoint.single)

Exit status 0, or 1 with a message for a checkpoint that is missing, damaged or incomplete.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import manifest, reader, single
from .manifest import CheckpointError


def _resolve(path: str) -> str:
    if manifest.is_checkpoint(path):
        return path
    found = manifest.candidates(path)
    if not found:
        raise CheckpointError(f"{path} is neither a checkpoint (no {manifest.MANIFEST}) nor a directory of them")
    return found[0]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _region(e: dict) -> str:
    """'0:64x0:32' for a box, plus '[a:b]' for a range within it."""
    box = "x".join(f"{a}:{b}" for a, b in e["box"]) or "scalar"
    return box + (f"[{e['flat'][0]}:{e['flat'][1]}]" if e["flat"] else "")


def inspect(path: str, out=None) -> None:
    out = out or sys.stdout  # looked up at call time: a redirected or captured stream
    rec = manifest.read(path)
    cfg = rec.get("extra", {}).get("config")
    extra = {k: v for k, v in rec.get("extra", {}).items() if k != "config"}
    print(f"checkpoint {path}", file=out)
    print(f"  step {rec['step']} | written by {rec['world_size']} ranks | layout {rec.get('layout')}", file=out)
    if "optimizer" in rec:
        o = rec["optimizer"]
        print(f"  optimizer {o['type']}: step count {o['steps']}, lr {o['lr']:.6g}, buffers {o['buffers']}", file=out)
    if "schedule" in rec:
        print(f"  schedule {rec['schedule']}", file=out)
    if "compressor" in rec:
        print(f"  compressor {rec['compressor']['spec']!r}", file=out)
    if cfg:
        print("  configuration: " + " ".join(f"{k}={v}" for k, v in sorted(cfg.items()) if v not in ("", None)),
              file=out)
    for k, v in sorted(extra.items()):
        print(f"  {k}: {json.dumps(v)}", file=out)
    by_name = {}
    for e in rec["entries"]:
        by_name.setdefault(e["name"], []).append(e)
    print(f"  {len(rec['arrays'])} arrays:", file=out)
    w = max([len(n) for n in rec["arrays"]] + [4])
    for name, info in sorted(rec["arrays"].items()):
        es = by_name.get(name, [])
        held = ", ".join(f"{e['file']}:{_region(e)}" for e in es[:3]) + (f", ... ({len(es)} pieces)" if len(es) > 3 else "")
        print(f"    {name:<{w}} {info['dtype']:>8} {str(tuple(info['shape'])):>16}  {held}", file=out)
    total = sum(f["bytes"] for f in rec["files"].values())
    print(f"  {len(rec['files'])} files, {_human(total)}: " + ", ".join(
        f"{n} ({_human(f['bytes'])})" for n, f in sorted(rec["files"].items())), file=out)


def convert(path: str, out: str) -> int:
    rec = manifest.read(path)
    entries = reader.Entries(path, rec)
    arrays = {name: reader.whole_array(entries, rec, name) for name in sorted(rec["arrays"])}
    meta = {k: rec[k] for k in ("step", "world_size", "layout", "optimizer", "schedule", "extra") if k in rec}
    single.save(out, arrays, dict(meta, source=os.path.abspath(path)))
    return len(arrays)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m disttrain.checkpoint", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inspect", help="print a checkpoint's manifest readably")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true", help="the raw manifest as JSON")
    p = sub.add_parser("verify", help="check every file's and entry's checksum")
    p.add_argument("dir")
    p = sub.add_parser("convert", help="write one consolidated file")
    p.add_argument("dir")
    p.add_argument("--to", choices=["single"], required=True, help="the target format")
    p.add_argument("out", help="the .npz file to write")
    a = ap.parse_args(argv)
    try:
        path = _resolve(a.dir)
        if a.cmd == "inspect":
            if a.json:
                print(json.dumps(manifest.read(path), indent=1, sort_keys=True))
            else:
                inspect(path)
        elif a.cmd == "verify":
            reader.verify(path)
            print(f"{path}: every file and entry matches its checksum")
        else:
            n = convert(path, a.out)
            print(f"{path} -> {a.out}: {n} arrays")
    except (CheckpointError, OSError) as e:
        print(f"python -m disttrain.checkpoint: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
