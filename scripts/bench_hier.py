"""Hierarchical allreduce on the emulated cluster: flat ring, "hier", the MPI library, "auto".

    sudo env PATH=/usr/sbin:$PATH python scripts/bench_hier.py --clusters 2x2,3x2 --rate 1gbit
    python scripts/bench_hier.py --from-json results/bench_hier.json            # reprint

Each cluster H x K runs ``launchers/emulated_cluster.sh --hosts H --ranks-per-host K --rate R``
(network namespaces, tc-shaped host ports; needs root) with this script as the worker. The
worker times, per size, one call of every series in interleaved rounds after a barrier (the
slowest rank's time; the median over rounds), validation off, in place; "auto" runs with the
built-in defaults (DISTTRAIN_COSTMODEL=defaults: no calibration) and the row says what it picked.

Link-bound time = bytes through one host's port / rate: a flat ring pushes 2(p-1)/p n through
it, a two-level algorithm 2(h-1)/h n (the least any allreduce can: each host must send out what
the others lack of its contribution and receive theirs). ``frac`` = that bound / time for the
series' own pattern (ring: flat; hier, mpi, auto: two-level), so 1.0 is the link's limit.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from _bench import ROOT, add_output_args, emit, run_result, save

SERIES = ("ring", "hier", "mpi", "auto")


def parse_bytes(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(s[:-1]) * mult[s[-1].upper()]) if s[-1].upper() in mult else int(s)


def parse_rate(s: str) -> float:
    """tc's rate syntax -> bytes per second ("1gbit" -> 1.25e8)."""
    s = s.lower()
    for suffix, mult in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)):
        if s.endswith(suffix):
            return float(s[:-len(suffix)]) * mult / 8
    raise ValueError(f"rate {s!r}: use tc syntax such as 1gbit or 100mbit")


def worker(a) -> None:
    # imported here: the driver runs as root outside MPI and must not start it (importing
    # mpi4py.MPI initialises MPI); only the worker ranks under mpiexec need these
    import disttrain as dt
    from disttrain.comm import costmodel, topology
    from mpi4py import MPI

    dt.init()
    dt.set_validation(False)
    comm = dt.world().comm
    t = topology.of(comm)
    p, h = comm.Get_size(), t.nodes
    rate = parse_rate(a.rate)
    rows = []
    for nb in (parse_bytes(s) for s in a.sizes.split(",")):
        x = np.ones(nb // 4, np.float32)
        calls = {"mpi": lambda: comm.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM)}
        calls.update({s: (lambda s=s: dt.allreduce_(x, algorithm=s)) for s in SERIES if s != "mpi"})
        times = {s: [] for s in SERIES}
        for s in SERIES:  # warm-up: connections, buffers
            calls[s]()
        for _ in range(a.reps):
            for s in SERIES:  # interleaved: drift hits every series alike
                comm.Barrier()
                t0 = time.perf_counter()
                calls[s]()
                times[s].append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
        flat = 2 * (p - 1) / p * x.nbytes / rate
        two = 2 * (h - 1) / h * x.nbytes / rate
        med = {s: float(np.median(v)) for s, v in times.items()}
        picked = costmodel.choose("allreduce", comm, x.nbytes, x.dtype)
        for s in SERIES:
            bound = flat if s == "ring" else two
            rows.append(dict(cluster=t.layout, hosts=h, p=p, bytes=int(x.nbytes), series=s, seconds=med[s],
                             min_s=float(np.min(times[s])), bound_s=bound, frac=bound / med[s],
                             vs_ring=med["ring"] / med[s], vs_mpi=med["mpi"] / med[s],
                             auto_picked=picked if s == "auto" else ""))
    emit(dict(rows=rows) if comm.Get_rank() == 0 else None)


def table(rows) -> None:
    print(f"{'cluster':>7} {'bytes':>10} {'series':>6} {'ms':>9} {'frac':>6} {'vs_ring':>8} {'vs_mpi':>7}  auto")
    for r in rows:
        print(f"{r['cluster']:>7} {r['bytes']:>10} {r['series']:>6} {1e3 * r['seconds']:>9.2f} {r['frac']:>6.2f} "
              f"{r['vs_ring']:>8.2f} {r['vs_mpi']:>7.2f}  {r['auto_picked']}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clusters", default="2x2,3x2", help="HOSTSxRANKS_PER_HOST, comma-separated")
    ap.add_argument("--rate", default="1gbit", help="link rate per direction (tc syntax)")
    ap.add_argument("--sizes", default="64K,256K,1M,4M,16M,64M")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    add_output_args(ap, "bench_hier")
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)
    if a.from_json:
        with open(a.from_json) as f:
            return table(json.load(f)["rows"])
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=ROOT, DISTTRAIN_COSTMODEL="defaults",
               PATH="/usr/sbin:/sbin:" + os.environ.get("PATH", ""))
    rows = []
    for cl in a.clusters.split(","):
        hosts, rph = cl.lower().split("x")
        cmd = [os.path.join(ROOT, "launchers", "emulated_cluster.sh"), "--hosts", hosts, "--ranks-per-host", rph,
               "--rate", a.rate, "--", os.path.abspath(__file__), "--worker", "--rate", a.rate, "--sizes", a.sizes,
               "--reps", str(a.reps)]
        rows += run_result(cmd, env, a.timeout)["rows"]
    load = open("/proc/loadavg").read().split()[:3]
    meta = dict(rate=a.rate, reps=a.reps, host=platform.node(), loadavg=load,
                when=time.strftime("%FT%TZ", time.gmtime()))
    save(a.out, meta, rows)
    table(rows)
    print(f"load average before saving: {' '.join(load)}")


if __name__ == "__main__":
    main()
