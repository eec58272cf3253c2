"""Collectives benchmark: every disttrain algorithm side by side with the MPI library's own.

    mpiexec -n 2 python scripts/bench_collectives.py                      # allreduce, 8 B .. 64 MiB
    mpiexec -n 4 python scripts/bench_collectives.py --collective alltoall --max-bytes 16M
    mpiexec -n 2 python scripts/bench_collectives.py --plot               # + PNG (pip install .[plot])
    python scripts/bench_collectives.py --from-json results/bench_allreduce_p2.json --plot   # redraw

For each message size the native call and every algorithm are timed in interleaved rounds (so
drift on a shared machine hits all of them alike); a round times a batch of back-to-back calls,
takes the slowest rank's mean, and the reported time is the median over rounds. disttrain runs
in place with validation off (the hot-loop configuration; validation costs one extra 24-byte
allreduce per call, shown separately as "auto+check"), native runs in place (MPI_IN_PLACE).

``--default-path`` (allreduce) measures instead what a user calls first: native is
``MPI_Allreduce(x, y)`` out of place (y allocated once), ours ``dt.allreduce(x)`` with its defaults
(a new result array, validation on), as "auto", "shm" and "mpi".

    launchers/local.sh 2 scripts/bench_collectives.py --default-path --min-bytes 64K

Bandwidths follow nccl-tests (PERFORMANCE.md there): algbw = bytes / time; busbw = algbw * 2(p-1)/p
for allreduce, (p-1)/p for allgather / reduce_scatter / alltoall, 1 for broadcast - the factor that
makes busbw comparable with link bandwidth whatever p is. ``ratio`` = native time / our time
(> 1: faster than the MPI library).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time

import numpy as np


def parse_bytes(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(s[:-1]) * mult[s[-1].upper()]) if s[-1].upper() in mult else int(s)


def busbw_factor(coll: str, p: int) -> float:
    return {"allreduce": 2 * (p - 1) / p, "broadcast": 1.0}.get(coll, (p - 1) / p) if p > 1 else 1.0


def make_calls(coll: str, comm, nbytes: int, dt, MPI, default_path: bool = False):
    """{series name: zero-argument callable} for one message size (float32 data)."""
    p = comm.Get_size()
    n = max(1, nbytes // 4)
    x = np.ones(n, np.float32)
    calls = {}
    if coll == "allreduce" and default_path:
        y = np.empty_like(x)
        calls["native"] = lambda: comm.Allreduce(x, y, op=MPI.SUM)
        for a in ("auto", "shm", "mpi"):
            calls[a] = (lambda a=a: dt.allreduce(x, algorithm=a))
    elif coll == "allreduce":
        calls["native"] = lambda: comm.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM)
        for a in list(dt.ALLREDUCE_ALGORITHMS) + ["auto"]:
            calls[a] = (lambda a=a: dt.allreduce_(x, algorithm=a))

        def checked():
            dt.set_validation(True)
            dt.allreduce_(x)
            dt.set_validation(False)
        calls["auto+check"] = checked
    elif coll == "alltoall":
        rows = max(p, n - n % p)
        x = np.ones(rows, np.float32)
        y = np.empty_like(x)
        calls["native"] = lambda: comm.Alltoall(x, y)
        for a in list(dt.ALLTOALL_ALGORITHMS) + ["auto"]:
            calls[a] = (lambda a=a: dt.alltoall(x, algorithm=a))
    elif coll == "allgather":
        y = np.empty(n * p, np.float32)
        calls["native"] = lambda: comm.Allgather(x, y)
        for a in ("ring", "mpi"):
            calls[a] = (lambda a=a: dt.allgather(x, algorithm=a))
    elif coll == "reduce_scatter":
        rows = max(p, n - n % p)
        x = np.ones(rows, np.float32)
        y = np.empty(rows // p, np.float32)
        calls["native"] = lambda: comm.Reduce_scatter_block(x, y, op=MPI.SUM)
        for a in ("ring", "mpi"):
            calls[a] = (lambda a=a: dt.reduce_scatter(x, algorithm=a))
    elif coll == "broadcast":
        calls["native"] = lambda: comm.Bcast(x, root=0)
        for a in ("tree", "mpi"):
            calls[a] = (lambda a=a: dt.broadcast_(x, root=0, algorithm=a))
    else:
        raise SystemExit(f"unknown collective {coll!r}")
    return calls, x.nbytes


def time_batch(fn, iters: int, comm, MPI) -> float:
    comm.Barrier()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return comm.allreduce((time.perf_counter() - t) / iters, op=MPI.MAX)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--collective", default="allreduce",
                    choices=["allreduce", "alltoall", "allgather", "reduce_scatter", "broadcast"])
    ap.add_argument("--min-bytes", default="8")
    ap.add_argument("--max-bytes", default="64M")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per size (median reported)")
    ap.add_argument("--batch-seconds", type=float, default=0.02, help="target duration of one timed batch")
    ap.add_argument("--default-path", action="store_true",
                    help="allreduce: out of place with validation on, vs MPI_Allreduce(x, y)")
    ap.add_argument("--calibrate", action="store_true", help="calibrate the cost model first (for auto)")
    ap.add_argument("--out", default="results", help="directory for the CSV/JSON (and PNG) files")
    ap.add_argument("--plot", action="store_true", help="draw a PNG (needs matplotlib: pip install .[plot])")
    ap.add_argument("--from-json", default="", help="re-print (and with --plot re-draw) a saved run; no MPI")
    a = ap.parse_args(argv)
    if a.from_json:
        with open(a.from_json) as f:
            saved = json.load(f)
        print_markdown(saved["rows"], saved["collective"], saved["p"])
        if a.plot:
            plot(saved["rows"], os.path.splitext(a.from_json)[0] + ".png", saved["collective"], saved["p"])
        return

    from mpi4py import MPI

    import disttrain as dt

    dt.init()
    comm = dt.world().comm
    p, rank = comm.Get_size(), comm.Get_rank()
    if a.calibrate:
        dt.calibrate()
    dt.set_validation(a.default_path)
    sizes, s = [], parse_bytes(a.min_bytes)
    while s <= parse_bytes(a.max_bytes):
        sizes.append(s)
        s *= 2
    rows = []
    if rank == 0:
        print(f"# {a.collective}, p={p}, float32, {MPI.Get_library_version().splitlines()[0].strip()}, "
              f"{platform.node()}; time in us (median of {a.rounds} rounds); ratio = native/ours")
    for nbytes in sizes:
        calls, real = make_calls(a.collective, comm, nbytes, dt, MPI, a.default_path)
        iters = {}
        for name, fn in calls.items():  # warm up (numba, scratch buffers) and size the batches
            t = time_batch(fn, 1, comm, MPI)
            t = min(t, time_batch(fn, 1, comm, MPI))
            iters[name] = int(min(2000, max(2, a.batch_seconds / max(t, 1e-7))))
        samples = {name: [] for name in calls}
        for _ in range(a.rounds):
            for name, fn in calls.items():
                samples[name].append(time_batch(fn, iters[name], comm, MPI))
        med = {name: float(np.median(v)) for name, v in samples.items()}
        for name, t in med.items():
            algbw = real / t / 1e9
            rows.append(dict(collective=a.collective, p=p, bytes=real, series=name, time_us=t * 1e6,
                             algbw_GBps=algbw, busbw_GBps=algbw * busbw_factor(a.collective, p),
                             ratio_vs_native=med["native"] / t))
        if rank == 0:
            cells = " ".join(f"{n}={med['native'] / t:.2f}" for n, t in med.items() if n != "native")
            print(f"{real:>10} B  native {med['native'] * 1e6:10.1f} us  {cells}", flush=True)
    if rank == 0:
        os.makedirs(a.out, exist_ok=True)
        stem = os.path.join(a.out, f"bench_{a.collective}_p{p}" + ("_default" if a.default_path else ""))
        with open(stem + ".csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        with open(stem + ".json", "w") as f:
            json.dump(dict(collective=a.collective, p=p, mpi=MPI.Get_library_version().splitlines()[0].strip(),
                           host=platform.node(), rows=rows), f, indent=1)
        print(f"# wrote {stem}.csv and {stem}.json")
        print_markdown(rows, a.collective, p)
        if a.plot:
            plot(rows, stem + ".png", a.collective, p)


def print_markdown(rows, coll, p):
    series = [s for s in dict.fromkeys(r["series"] for r in rows) if s != "native"]
    print("\n| bytes | native us | native busbw GB/s | " + " | ".join(series) + " |")
    print("|---:|---:|---:|" + "---:|" * len(series))
    for b in dict.fromkeys(r["bytes"] for r in rows):
        rs = {r["series"]: r for r in rows if r["bytes"] == b}
        nat = rs["native"]
        print(f"| {b} | {nat['time_us']:.1f} | {nat['busbw_GBps']:.2f} | "
              + " | ".join(f"{rs[s]['ratio_vs_native']:.2f}" for s in series) + " |")


def plot(rows, path, coll, p):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# --plot needs matplotlib: pip install 'disttrain[plot]'")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for s in dict.fromkeys(r["series"] for r in rows):
        rs = [r for r in rows if r["series"] == s]
        style = dict(lw=2.5, color="k") if s == "native" else {}
        ax1.loglog([r["bytes"] for r in rs], [r["time_us"] for r in rs], marker=".", label=s, **style)
        ax2.semilogx([r["bytes"] for r in rs], [r["busbw_GBps"] for r in rs], marker=".", label=s, **style)
    ax1.set(xlabel="message size (bytes)", ylabel="time (us)", title=f"{coll}, p={p}")
    ax2.set(xlabel="message size (bytes)", ylabel="bus bandwidth (GB/s)", title="busbw (nccl-tests definition)")
    ax1.grid(True, which="both", alpha=0.3)
    ax2.grid(True, alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
