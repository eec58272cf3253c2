"""What one collective call costs on the path a user calls first: ``dt.allreduce(x)`` with its
defaults (new result array, validation on, "auto"), side by side with the MPI library's
``MPI_Allreduce(x, y)``, with validation off, and the cross-rank validation check alone (one
interruptible 24-byte MPI_Iallreduce carrying the call's fingerprint and sequence number).

    launchers/local.sh 2 scripts/bench_call_overhead.py [--sizes 8,64,512,4K,64K,1M] [--json out.json]

Prints microseconds per call (median over rounds of the mean of a batch) and ratios to MPI.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
from mpi4py import MPI

import disttrain as dt
from disttrain.comm import validate


def timed(fn, comm, reps: int, rounds: int = 7) -> float:
    fn()
    ts = []
    for _ in range(rounds):
        comm.Barrier()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        ts.append((time.perf_counter() - t) / reps)
    return comm.allreduce(float(np.median(ts)), op=MPI.MAX)


def parse_size(s: str) -> int:
    return int(float(s.rstrip("KMkm")) * {"K": 1 << 10, "M": 1 << 20}.get(s[-1].upper(), 1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="8,64,512,4K,64K,1M")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    dt.init()
    comm = dt.world().comm
    rows = []
    if dt.rank() == 0:
        print(f"P={dt.size()}  us per call (ratio to MPI_Allreduce(x, y))")
        print(f"{'bytes':>9} {'MPI':>8} {'dt default':>16} {'dt no-validate':>18} {'check alone':>12}")
    for s in a.sizes.split(","):
        nb = parse_size(s)
        x = np.ones(max(1, nb // 8), np.float64)
        y = np.empty_like(x)
        reps = 200 if nb <= 4096 else 20
        t_mpi = timed(lambda: comm.Allreduce(x, y, op=MPI.SUM), comm, reps)
        t_dt = timed(lambda: dt.allreduce(x), comm, reps)
        dt.set_validation(False)
        t_nv = timed(lambda: dt.allreduce(x), comm, reps)
        dt.set_validation(True)
        fields = {"shape": x.shape, "dtype": x.dtype.str, "op": "sum", "algorithm": "auto"}
        t_chk = timed(lambda: validate.check(comm, "allreduce", fields, None), comm, reps)
        rows.append(dict(bytes=x.nbytes, mpi_s=t_mpi, default_s=t_dt, no_validate_s=t_nv, check_s=t_chk, p=dt.size()))
        if dt.rank() == 0:
            print(f"{x.nbytes:>9} {t_mpi * 1e6:>8.1f} {t_dt * 1e6:>9.1f} ({t_dt / t_mpi:4.2f}x) "
                  f"{t_nv * 1e6:>10.1f} ({t_nv / t_mpi:4.2f}x) {t_chk * 1e6:>12.1f}", flush=True)
    if a.json and dt.rank() == 0:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
