"""What one collective call costs on the path a user calls first: ``dt.allreduce(x)`` with its
defaults (new result array, validation on, "auto"), side by side with the MPI library's
``MPI_Allreduce(x, y)`` (y allocated once, outside the timing), plus the first call at each size
alone (page faults of a fresh result, window growth), the call with validation off, the
explicit "shm" and "mpi" algorithms, and the cross-rank validation check alone.

    launchers/local.sh 2 scripts/bench_call_overhead.py [--sizes 8,4K,64K,1M,16M] [--json out.json]

Prints microseconds per call (median - or with ``--stat min`` the minimum - over rounds of the mean
of a batch, the slowest rank's) and
the library's time divided by ours (> 1: we are faster); "auto->" is what "auto" ran. "dt default"
is the warm call; "+1st" is honest about first use: the first call at the size and the warm
calls of one batch averaged together - (first + (reps - 1) x warm) / reps - against the library's
own first call and warm calls averaged the same way (its result buffer is fresh too).
"off/on" is the default call's time divided by the same call's with validation off, measured in
the same run (>= 1: off is no slower; call8 - it was 0.37-0.49x on merged main before, off
leaving the fused round for the general path).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
from mpi4py import MPI

import disttrain as dt
from disttrain.comm import fused, node, validate
from disttrain.comm.costmodel import choose

SIZES = "8,64,512,4K,64K,256K,1M,4M,16M,64M"


STAT = np.median


ROUNDS = 7


def timed(fn, comm, reps: int) -> float:
    rounds = ROUNDS
    fn()
    ts = []
    for _ in range(rounds):
        comm.Barrier()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        ts.append((time.perf_counter() - t) / reps)
    return comm.allreduce(float(STAT(ts)), op=MPI.MAX)


def first(fn, comm) -> float:
    comm.Barrier()
    t = time.perf_counter()
    fn()
    return comm.allreduce(time.perf_counter() - t, op=MPI.MAX)


def parse_size(s: str) -> int:
    return int(float(s.rstrip("KMkm")) * {"K": 1 << 10, "M": 1 << 20}.get(s[-1].upper(), 1))


def picked(comm, x) -> str:
    if fused.eligible(x.nbytes, x.dtype, x.dtype, 0, "auto", comm.Get_size()) and node.get(comm) is not None:
        return "fused"
    return choose("allreduce", comm, x.nbytes, x.dtype)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=SIZES)
    ap.add_argument("--json", default="")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--stat", choices=["median", "min"], default="median",
                    help="over rounds; min estimates the unloaded cost on a shared machine")
    a = ap.parse_args(argv)
    global STAT, ROUNDS
    STAT, ROUNDS = {"median": np.median, "min": np.min}[a.stat], a.rounds
    dt.init()
    comm = dt.world().comm
    # MPICH sets up a communicator's collectives at their first use: the first Barrier here left
    # the ranks ~2 ms apart, which the first timed call (ours) absorbed. Warm the barrier only.
    comm.Barrier()
    rows, lines = [], []
    lines.append(f"P={dt.size()}  us per call; (x) = MPI_Allreduce(x, y) time / ours")
    lines.append(f"{'bytes':>9} {'MPI':>8} {'dt default':>16} {'first call':>11} {'no-validate':>16} "
                 f"{'shm':>16} {'mpi':>16} {'check':>7} {'+1st':>8} {'off/on':>7}  auto->")
    for s in a.sizes.split(","):
        nb = parse_size(s)
        x = np.ones(max(1, nb // 8), np.float64)
        y = np.empty_like(x)
        reps = 200 if nb <= 4096 else max(2, min(50, (32 << 20) // nb))
        t_first = first(lambda: dt.allreduce(x), comm)  # before anything else touched this size
        t_mpi_first = first(lambda: comm.Allreduce(x, y, op=MPI.SUM), comm)  # y is fresh: its page faults
        t_mpi = timed(lambda: comm.Allreduce(x, y, op=MPI.SUM), comm, reps)
        t_dt = timed(lambda: dt.allreduce(x), comm, reps)
        t_shm = timed(lambda: dt.allreduce(x, algorithm="shm"), comm, reps) if dt.size() > 1 else float("nan")
        t_lib = timed(lambda: dt.allreduce(x, algorithm="mpi"), comm, reps)
        dt.set_validation(False)
        t_nv = timed(lambda: dt.allreduce(x), comm, reps)
        dt.set_validation(True)
        fields = {"shape": x.shape, "dtype": x.dtype.str, "op": "sum", "algorithm": "auto"}
        t_chk = timed(lambda: validate.check(comm, "allreduce", fields, None), comm, reps)
        auto = picked(comm, x)
        t_dt1 = (t_first + (reps - 1) * t_dt) / reps
        t_mpi1 = (t_mpi_first + (reps - 1) * t_mpi) / reps
        rows.append(dict(bytes=x.nbytes, p=dt.size(), mpi_s=t_mpi, default_s=t_dt, first_s=t_first, no_validate_s=t_nv,
                         shm_s=t_shm, mpi_alg_s=t_lib, check_s=t_chk, auto=auto, mpi_first_s=t_mpi_first,
                         default_with_first_s=t_dt1, mpi_with_first_s=t_mpi1, off_over_on=t_dt / t_nv, reps=reps))
        def col(t):
            return f"{t * 1e6:>9.1f} ({t_mpi / t:4.2f}x)"
        # printed at the end: rank 0's output goes through the launcher's proxy, which wakes on
        # one of the cores while the next size's first calls (ours first) were being timed
        lines.append(f"{x.nbytes:>9} {t_mpi * 1e6:>8.1f} {col(t_dt)} {t_first * 1e6:>11.1f} {col(t_nv)} {col(t_shm)} "
                     f"{col(t_lib)} {t_chk * 1e6:>7.1f} {t_mpi1 / t_dt1:>7.2f}x {t_dt / t_nv:>6.2f}x  {auto}")
    if dt.rank() == 0:
        print("\n".join(lines), flush=True)
    if a.json and dt.rank() == 0:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
