"""Where the default call's time goes at one size, piece by piece, side by side in one run:
the library's ``MPI_Allreduce(x, y)`` with one y, with a fresh y per call and with a pooled y;
our validation round alone; ``dt.allreduce(x, algorithm="mpi")`` with and without validation;
the default call; and first use - a fresh size per call (ours and the library's alternating who
goes first) - plus a fresh buffer's page faults alone.

    launchers/local.sh 2 scripts/bench_call_pieces.py [--sizes 1M,4M] [--rounds 9] [--json out.json]

Prints microseconds per call (the slowest rank's mean over a batch; median and min over
interleaved rounds, so that noise hits every column alike).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
from mpi4py import MPI

import disttrain as dt
from disttrain.comm import validate
from disttrain.comm.pool import pool

from bench_call_overhead import parse_size


def batch(fn, comm, reps: int) -> float:
    comm.Barrier()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return comm.allreduce((time.perf_counter() - t) / reps, op=MPI.MAX)


def first_use(comm, nb: int, k: int, ours_first: bool) -> tuple:
    """The first call at a size never used before (k-th fresh size), ours and the library's."""
    n = nb // 8 + 8 * k + (0 if ours_first else 4)  # a new shape for each, never seen before
    x = np.ones(n, np.float64)
    xl = np.ones(n + 2, np.float64)
    out = {}

    def ours():
        comm.Barrier()
        t = time.perf_counter()
        dt.allreduce(x)
        out["dt"] = comm.allreduce(time.perf_counter() - t, op=MPI.MAX)

    def lib():
        y = np.empty_like(xl)  # fresh, as the caller of MPI_Allreduce(x, y) must make one
        comm.Barrier()
        t = time.perf_counter()
        comm.Allreduce(xl, y, op=MPI.SUM)
        out["lib"] = comm.allreduce(time.perf_counter() - t, op=MPI.MAX)

    for f in ((ours, lib) if ours_first else (lib, ours)):
        f()
    return out["dt"], out["lib"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1M,4M")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    dt.init()
    comm = dt.world().comm
    comm.Barrier()
    lines, rows = [f"P={dt.size()}  us per call: median (min) over {a.rounds} interleaved rounds"], []
    for s in a.sizes.split(","):
        nb = parse_size(s)
        x = np.ones(nb // 8, np.float64)
        y = np.empty_like(x)
        reps = max(2, min(20, (16 << 20) // nb))
        fields = {"shape": x.shape, "dtype": x.dtype.str, "op": "sum", "algorithm": "mpi"}

        def no_validation():
            dt.set_validation(False)
            try:
                dt.allreduce(x, algorithm="mpi")
            finally:
                dt.set_validation(True)

        def touch():
            b = np.empty(nb, np.uint8)
            b[::4096] = 0  # one write per page: the page faults of a fresh result

        pieces = {
            "lib(x,y)": lambda: comm.Allreduce(x, y, op=MPI.SUM),
            "lib(x,fresh y)": lambda: comm.Allreduce(x, np.empty_like(x), op=MPI.SUM),
            "lib(x,pool y)": lambda: comm.Allreduce(x, pool.empty(x.shape, x.dtype), op=MPI.SUM),
            "fresh pages": touch,
            "check": lambda: validate.check(comm, "allreduce", fields, None),
            "dt mpi no-val": no_validation,
            "dt mpi": lambda: dt.allreduce(x, algorithm="mpi"),
            "dt default": lambda: dt.allreduce(x),
        }
        for fn in pieces.values():  # warm every piece once
            fn()
        ts = {k: [] for k in pieces}
        firsts = {"dt first": [], "lib first": []}
        for rnd in range(a.rounds):
            order = list(pieces) if rnd % 2 == 0 else list(pieces)[::-1]
            for k in order:
                ts[k].append(batch(pieces[k], comm, reps))
            f_dt, f_lib = first_use(comm, nb, rnd, rnd % 2 == 0)
            firsts["dt first"].append(f_dt)
            firsts["lib first"].append(f_lib)
        ts.update(firsts)
        row = {k: (float(np.median(v)) * 1e6, float(np.min(v)) * 1e6) for k, v in ts.items()}
        rows.append(dict(bytes=nb, p=dt.size(), **{k: v[0] for k, v in row.items()}))
        lines.append(f"{nb} bytes:")
        lines += [f"  {k:<16} {m:>10.1f} ({lo:.1f})" for k, (m, lo) in row.items()]
    if dt.rank() == 0:
        print("\n".join(lines), flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
