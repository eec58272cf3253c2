"""Checkpoint cost, side by side in one run (ratios, so the shared machine's noise hits both sides).

    mpiexec -n 4 python scripts/bench_checkpoint.py [--mparams 16] [--repeat 3] [--out bench_checkpoint.json]

Rows (median seconds of --repeat runs each, on --mparams million float32 parameters in 8 arrays):

- save, replicated (data-parallel) state: ``dt.save_checkpoint`` (the holders of each replicated
  region take turns: every rank writes and hashes about 1/P of the bytes) vs the obvious
  alternative, rank 0 writing everything (``checkpoint.single.save`` of the full arrays, what
  the main job did before directories);
- load, same layout: ``dt.load_checkpoint`` (every rank maps and verifies what it needs) vs rank 0
  reading the single file and broadcasting every array;
- load, resharded: row blocks saved, loaded as row blocks (slice copies) vs as flat ranges of
  each array (mixed box / range overlaps: the general path) - the price of the general path.

Writes JSON (and CSV next to it) with every time and the ratios; rank 0 prints a table.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

import disttrain as dt
from disttrain import broadcast_
from disttrain.checkpoint import single
from disttrain.nn.layout import Piece, whole
from disttrain.nn.module import Parameter

N_ARRAYS = 8


def _shapes(mparams: float) -> list:
    rows = max(8, int(np.sqrt(mparams * 1e6 / N_ARRAYS)))
    return [(rows + i, rows - i) for i in range(N_ARRAYS)]  # uneven, not divisible


def _params(shapes, scheme: str) -> list:
    r, p = dt.rank(), dt.size()
    out = []
    for i, shape in enumerate(shapes):
        rng = np.random.default_rng(i)
        full = rng.standard_normal(shape, dtype=np.float32)
        if scheme == "whole":
            out.append(Parameter(full, name=f"w{i}"))
            continue
        if scheme == "rows":
            b = np.linspace(0, shape[0], p + 1).astype(int)
            box = ((int(b[r]), int(b[r + 1])), (0, shape[1]))
            out.append(Parameter(full[box[0][0]:box[0][1]], name=f"w{i}", layout=[Piece(None, shape, box)]))
            continue
        b = np.linspace(0, full.size, p + 1).astype(int)  # flat ranges of the whole array (ZeRO-3 style)
        flat = (int(b[r]), int(b[r + 1]))
        out.append(Parameter(full.reshape(-1)[flat[0]:flat[1]].copy(), name=f"w{i}",
                             layout=[Piece(None, shape, whole(shape), flat=flat)]))
    return out


def _timed(fn, repeat: int) -> float:
    ts = []
    for _ in range(repeat):
        dt.world().comm.Barrier()
        t = time.perf_counter()
        fn()
        dt.world().comm.Barrier()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mparams", type=float, default=16.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="bench_checkpoint.json")
    a = ap.parse_args()
    dt.init()
    comm = dt.world().comm
    d = comm.bcast(tempfile.mkdtemp(prefix="bench-ckpt-") if dt.rank() == 0 else None)
    shapes = _shapes(a.mparams)
    rep = _params(shapes, "whole")
    step = iter(range(1, 1 << 30))

    def rank0_save():
        if dt.rank() == 0:
            single.save(os.path.join(d, "one.npz"), {p.name: p.data for p in rep}, {"step": 0})

    def rank0_load():
        arrays = single.load(os.path.join(d, "one.npz"))[0] if dt.rank() == 0 else None
        for p in rep:
            if dt.rank() == 0:
                p.data[...] = arrays[p.name]
            broadcast_(p.data, root=0)

    res = {"ranks": dt.size(), "mparams": sum(int(np.prod(s)) for s in shapes) / 1e6, "repeat": a.repeat}
    res["save_sharded_s"] = _timed(lambda: dt.save_checkpoint(os.path.join(d, "rep"), next(step), model=rep), a.repeat)
    res["save_rank0_s"] = _timed(rank0_save, a.repeat)
    res["load_sharded_s"] = _timed(lambda: dt.load_checkpoint(os.path.join(d, "rep"), model=rep), a.repeat)
    res["load_rank0_bcast_s"] = _timed(rank0_load, a.repeat)
    rows = _params(shapes, "rows")
    dt.save_checkpoint(os.path.join(d, "rows"), 1, model=rows)
    res["load_rows_as_rows_s"] = _timed(lambda: dt.load_checkpoint(os.path.join(d, "rows"), model=rows), a.repeat)
    flat = _params(shapes, "flat")
    res["load_rows_as_flat_s"] = _timed(lambda: dt.load_checkpoint(os.path.join(d, "rows"), model=flat), a.repeat)
    res["save_ratio_rank0_over_sharded"] = res["save_rank0_s"] / res["save_sharded_s"]
    res["load_ratio_rank0_over_sharded"] = res["load_rank0_bcast_s"] / res["load_sharded_s"]
    res["reshard_ratio_flat_over_rows"] = res["load_rows_as_flat_s"] / res["load_rows_as_rows_s"]
    if dt.rank() == 0:
        for k, v in res.items():
            print(f"{k:32} {v:.4g}" if isinstance(v, float) else f"{k:32} {v}")
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.splitext(a.out)[0] + ".csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(res.keys())
            w.writerow(res.values())
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
