"""Calibrate the cost model and print predicted vs measured allreduce times per algorithm and size.

    mpiexec -n 2 python scripts/costmodel_check.py --sizes 8,4K,64K,1M,4M,16M,64M --json results/costmodel_p2.json

Also saves the calibration to the per-user cache (~/.cache/disttrain/costmodel-pP-hostsH[-LAYOUT].json),
which algorithm="auto" loads in later jobs of the same size and layout. On the emulated cluster:

    sudo env PATH=/usr/sbin:$PATH launchers/emulated_cluster.sh --hosts 2 --ranks-per-host 2 --rate 1gbit -- \
        scripts/costmodel_check.py --sizes 64K,1M,4M,16M --save /tmp/cm-2x2.json
"""
import argparse
import json
from dataclasses import asdict

import numpy as np
from mpi4py import MPI

import disttrain as dt
from disttrain.comm import costmodel


def main(argv=None) -> None:
    """Calibrate, then print predicted vs measured time of every allreduce algorithm per size.

    mpiexec -n 2 python scripts/costmodel_check.py [--sizes 1M,4M,16M,64M] [--json out.json]
    """
    ap = argparse.ArgumentParser(description=main.__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="8,4K,64K,1M,4M,16M,64M", help="bytes, K/M suffixes")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--save", default="", help="write the calibrated parameters here (default: the per-user "
                    "cache that later jobs load)")
    ap.add_argument("--json", default="", help="write the comparison rows to this JSON file")
    a = ap.parse_args(argv)
    dt.init()
    dt.set_validation(False)
    comm = dt.world().comm
    c = costmodel.calibrate(save=a.save or costmodel.cache_file(comm))
    rows = []
    if dt.rank() == 0:
        print(f"p={c.p} alpha={c.alpha * 1e6:.2f} us  1/beta={1 / c.beta / 1e9:.2f} (1 MiB) "
              f"{1 / c.beta_large / 1e9:.2f} (32 MiB) GB/s  1/gamma={1 / c.gamma / 1e9:.2f} / "
              f"{1 / c.gamma_large / 1e9:.2f} GB/s  o[us]=" +
              " ".join(f"{k}:{v * 1e6:.0f}" for k, v in c.overhead.items()))
        if c.hosts > 1:  # the two levels, measured separately (alpha/beta above: inside a node)
            print(f"hosts={c.hosts} layout={c.layout} between nodes: alpha={c.alpha_inter * 1e6:.1f} us  "
                  f"1/beta={1 / c.beta_inter / 1e9:.3f} GB/s through a node's port")
        print(f"{'algorithm':>13} {'bytes':>10} {'predicted_us':>13} {'measured_us':>12} {'error':>7}")
    for s in a.sizes.split(","):
        nb = int(float(s.rstrip("KMkm")) * {"K": 1 << 10, "M": 1 << 20}.get(s[-1].upper(), 1))
        x = np.ones(max(1, nb // 4), np.float32)
        for alg in dt.comm.ALLREDUCE.costs:
            if not np.isfinite(costmodel.predict(c, alg, x.nbytes)):
                continue  # this group cannot run it (shm across hosts)
            comm.Barrier()
            t = costmodel.timed(lambda: dt.allreduce_(x, algorithm=alg), a.reps)
            t = comm.allreduce(t, op=MPI.MAX)
            pred = costmodel.predict(c, alg, x.nbytes)
            rows.append(dict(algorithm=alg, bytes=x.nbytes, predicted_s=pred, measured_s=t, p=c.p))
            if dt.rank() == 0:
                print(f"{alg:>13} {x.nbytes:>10} {pred * 1e6:>13.1f} {t * 1e6:>12.1f} {(pred - t) / t:>+7.0%}")
    if a.json and dt.rank() == 0:
        with open(a.json, "w") as f:
            json.dump(dict(params=asdict(c), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
