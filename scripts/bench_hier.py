"""Hierarchical collectives on the emulated cluster: flat, "hier", the MPI library, "auto".

    sudo env PATH=/usr/sbin:$PATH python scripts/bench_hier.py --clusters 2x2,3x2 --rate 1gbit
    sudo env PATH=/usr/sbin:$PATH python scripts/bench_hier.py --families allgather,alltoall
    python scripts/bench_hier.py --from-json results/bench_hier.json            # reprint

Each cluster H x K runs ``launchers/emulated_cluster.sh --hosts H --ranks-per-host K --rate R``
(network namespaces, tc-shaped host ports; needs root) with this script as the worker. The
worker times, per size, one call of every series in interleaved rounds after a barrier (the
slowest rank's time; the median over rounds), validation off, in place; "auto" runs with the
built-in defaults (DISTTRAIN_COSTMODEL=defaults: no calibration) and the row says what it picked.

Families: allreduce, allgather, reduce_scatter (flat series: the ring) and alltoall (flat:
pairwise; equal splits); each family's series are the flat algorithm, "hier", the library's
collective (MPI_Allreduce / Allgather / Reduce_scatter_block / Alltoall) and "auto", through the
public calls. Link-bound time = bytes through one host's port / rate (bound_bytes): for the
allreduce a flat ring pushes 2(p-1)/p n through it, a two-level algorithm 2(h-1)/h n (the least
any allreduce can: each host must send out what the others lack of its contribution and receive
theirs); allgather and reduce-scatter half of that; an alltoall k n (p-k)/p whatever the
algorithm. ``frac`` = that bound / time for the series' own pattern (flat: flat; hier, mpi,
auto: two-level), so 1.0 is the link's limit.
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

#: family -> (flat algorithm, default sizes). Series per family: the flat algorithm, "hier", the
#: MPI library's collective and "auto". Sizes: allreduce / reduce-scatter the vector, allgather
#: the gathered result, alltoall what one rank sends (equal splits).
FAMILIES = {"allreduce": ("ring", "64K,256K,1M,4M,16M,64M"), "allgather": ("ring", "64K,1M,4M,16M,64M"),
            "reduce_scatter": ("ring", "64K,1M,4M,16M,64M"), "alltoall": ("pairwise", "1K,16K,256K,4M,16M")}


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


def bound_bytes(family: str, series: str, flat: str, n: int, p: int, sizes) -> float:
    """Bytes through the busiest host port (one direction) for `series`' pattern.

    allreduce: flat ring 2(p-1)/p n, two-level 2(h-1)/h n; allgather and reduce-scatter: flat ring
    (p-1)/p n, two-level (h-1)/h n (each host receives, resp. sends out, every remote byte once);
    alltoall: every algorithm k n (p-k)/p (what a node's k ranks send off the node)."""
    h, k = len(sizes), max(sizes)
    if family == "alltoall":
        return k * n * (p - k) / p
    twice = 2 if family == "allreduce" else 1
    return twice * ((p - 1) / p if series == flat else (h - 1) / h) * n


def calls_for(family: str, flat: str, comm, nbytes: int) -> dict:
    """series -> a zero-argument call; the disttrain ones are the public calls (validation off)."""
    # imported here: see worker()
    import disttrain as dt
    from mpi4py import MPI

    p = comm.Get_size()
    if family == "allreduce":
        x = np.ones(nbytes // 4, np.float32)
        lib = lambda: comm.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM)  # noqa: E731
        ours = lambda s: (lambda: dt.allreduce_(x, algorithm=s))  # noqa: E731
    elif family == "allgather":
        x = np.ones(nbytes // 4 // p, np.float32)
        y = np.empty(x.size * p, np.float32)
        lib = lambda: comm.Allgather(x, y)  # noqa: E731
        ours = lambda s: (lambda: dt.allgather(x, algorithm=s))  # noqa: E731
    elif family == "reduce_scatter":
        x = np.ones(nbytes // 4 // p * p, np.float32)
        y = np.empty(x.size // p, np.float32)
        lib = lambda: comm.Reduce_scatter_block(x, y, op=MPI.SUM)  # noqa: E731
        ours = lambda s: (lambda: dt.reduce_scatter(x, algorithm=s))  # noqa: E731
    else:
        x = np.ones(nbytes // p * p, np.uint8)
        y = np.empty_like(x)
        lib = lambda: comm.Alltoall(x, y)  # noqa: E731
        ours = lambda s: (lambda: dt.alltoall(x, algorithm=s))  # noqa: E731
    return {flat: ours(flat), "hier": ours("hier"), "mpi": lib, "auto": ours("auto")}, x


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
    for family in a.families.split(","):
        flat, default = FAMILIES[family]
        for nb in (parse_bytes(s) for s in (a.sizes or default).split(",")):
            calls, x = calls_for(family, flat, comm, nb)
            times = {s: [] for s in calls}
            for s in calls:  # warm-up: connections, buffers
                calls[s]()
            for _ in range(a.reps):
                for s in calls:  # interleaved: drift hits every series alike
                    comm.Barrier()
                    t0 = time.perf_counter()
                    calls[s]()
                    times[s].append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
            med = {s: float(np.median(v)) for s, v in times.items()}
            n = x.nbytes * (p if family == "allgather" else 1)
            agreed = n if family != "alltoall" else costmodel.agreed_bytes(comm, x.nbytes)
            picked = costmodel.choose(family, comm, agreed, x.dtype if family != "alltoall" else np.dtype(np.uint8))
            for s in calls:
                bound = bound_bytes(family, s, flat, n, p, t.sizes) / rate
                rows.append(dict(family=family, cluster=t.layout, hosts=h, p=p, bytes=int(n), series=s,
                                 seconds=med[s], min_s=float(np.min(times[s])), bound_s=bound, frac=bound / med[s],
                                 vs_flat=med[flat] / med[s], vs_mpi=med["mpi"] / med[s],
                                 auto_picked=picked if s == "auto" else ""))
    emit(dict(rows=rows) if comm.Get_rank() == 0 else None)


def table(rows) -> None:
    print(f"{'family':>14} {'cluster':>7} {'bytes':>10} {'series':>8} {'ms':>9} {'frac':>6} {'vs_flat':>8} "
          f"{'vs_mpi':>7}  auto")
    for r in rows:
        vs_flat = r.get("vs_flat", r.get("vs_ring"))  # files written before the other families
        print(f"{r.get('family', 'allreduce'):>14} {r['cluster']:>7} {r['bytes']:>10} {r['series']:>8} "
              f"{1e3 * r['seconds']:>9.2f} {r['frac']:>6.2f} {vs_flat:>8.2f} {r['vs_mpi']:>7.2f}  {r['auto_picked']}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clusters", default="2x2,3x2", help="HOSTSxRANKS_PER_HOST, comma-separated")
    ap.add_argument("--rate", default="1gbit", help="link rate per direction (tc syntax)")
    ap.add_argument("--families", default="allreduce,allgather,reduce_scatter,alltoall",
                    help=f"comma-separated, of {list(FAMILIES)}")
    ap.add_argument("--sizes", default="", help="bytes per call (default: per family, see FAMILIES)")
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
               "--rate", a.rate, "--", os.path.abspath(__file__), "--worker", "--rate", a.rate, "--families", a.families,
               "--sizes", a.sizes,
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
