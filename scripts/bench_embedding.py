"""DLRM step time with sparse embedding updates vs the dense sweep, table- and row-wise.

    python scripts/bench_embedding.py                      # P = 1, 2; Adam and SGD; ~3.8 M rows
    python scripts/bench_embedding.py --from-json results/bench_embedding.json

Every P is one ``mpiexec -n P`` job. In it, for each sharding and optimizer, two DLRM models with
the same seed train side by side on the same power-law batches, their steps interleaved (dense,
sparse, dense, ...) so that the shared machine's noise hits both: ``--no-sparse-embeddings`` (the
dense gradient, mostly zeros, swept by the optimizer and by zero_grad every step) and the default
row-sparse gradients (only the looked-up rows updated: lazy Adam, plain SGD). Each phase of a step
is timed on every rank (forward + backward with its AllToAlls and allreduce, optimizer step,
zero_grad); a step's time is the slowest rank's, and the table reports medians over --steps steps
and the dense / sparse ratio. Also: rows per rank, rows a step touched, and the seconds each rank
took to initialise its shard (counter-based: only its own rows are drawn).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from _bench import ROOT, add_output_args, emit, rows_over_procs


def worker(a) -> None:
    sys.path.insert(0, ROOT)
    import disttrain as dt
    from disttrain import nn, optim
    from disttrain.data.clicks import power_law_ids
    from disttrain_zoo.dlrm import DLRM

    dt.init()
    P, me, comm = dt.size(), dt.rank(), dt.world().comm
    sizes = [int(v) for v in a.tables.split(",")]
    rng = np.random.default_rng(100 + me)
    perms = [np.random.default_rng(t).permutation(n) for t, n in enumerate(sizes)]
    batches = [(rng.standard_normal((a.batch, 8)).astype(np.float32),
                np.stack([power_law_ids(rng, a.batch, n, a.alpha, perm) for n, perm in zip(sizes, perms)], axis=1),
                (rng.random((a.batch, 1)) < 0.3).astype(np.float32)) for _ in range(a.warmup + a.steps)]
    makers = {"adam": lambda ps: optim.Adam(ps, lr=1e-3), "sgd": lambda ps: optim.SGD(ps, lr=0.05)}
    rows = []
    for sharding in a.shardings.split(","):
        for opt_name in a.optimizers.split(","):
            runs = {}
            for mode in ("dense", "sparse"):
                comm.Barrier()
                t = time.perf_counter()
                m = DLRM(sizes, dim=a.dim, dense=8, bottom=(64,), top=(64,), sharding=sharding, seed=0,
                         sparse=mode == "sparse")
                init_s = time.perf_counter() - t
                ddp = dt.DataParallel(m, bucket_mb=25)
                runs[mode] = dict(model=m, ddp=ddp, opt=makers[opt_name](m.parameters()), init_s=init_s,
                                  times=[], touched=[])
            loss_fn = nn.BCEWithLogits()
            for i, (dense_x, ids, y) in enumerate(batches):
                for mode, r in runs.items():  # interleaved: the same noise for both
                    comm.Barrier()
                    t0 = time.perf_counter()
                    loss_fn.forward(r["ddp"].forward((dense_x, ids)), y)
                    r["ddp"].backward(loss_fn.backward())
                    t1 = time.perf_counter()
                    r["opt"].step()
                    t2 = time.perf_counter()
                    g = r["model"].embeddings.shard.grad
                    touched = g.nnz_rows if mode == "sparse" else 0
                    r["opt"].zero_grad()
                    t3 = time.perf_counter()
                    # the step takes as long as its slowest rank
                    phases = dt.allreduce(np.array([t1 - t0, t2 - t1, t3 - t2, t3 - t0]), op="max", algorithm="mpi")
                    if i >= a.warmup:
                        r["times"].append(phases)
                        r["touched"].append(touched)
            per_mode = {}
            for mode, r in runs.items():
                med = np.median(np.array(r["times"]), axis=0) * 1e3
                per_mode[mode] = dict(fwd_bwd_ms=med[0], opt_ms=med[1], zero_ms=med[2], step_ms=med[3])
                owned = comm.gather(r["model"].embeddings.owned_rows(), root=0)
                touched = comm.gather(float(np.mean(r["touched"])), root=0)
                init = comm.gather(r["init_s"], root=0)
                per_mode[mode].update(owned_rows=owned, touched_rows=touched, init_s=init)
            if me == 0:
                d, s = per_mode["dense"], per_mode["sparse"]
                rows.append(dict(P=P, sharding=sharding, optimizer=opt_name, tables=sizes, dim=a.dim,
                                 batch_per_rank=a.batch, alpha=a.alpha, steps=a.steps,
                                 owned_rows=d["owned_rows"], touched_rows=s["touched_rows"],
                                 init_s=s["init_s"],
                                 **{f"{k}_{mode}": v[k] for mode, v in per_mode.items()
                                    for k in ("fwd_bwd_ms", "opt_ms", "zero_ms", "step_ms")},
                                 speedup=d["step_ms"] / s["step_ms"]))
            del runs
    emit(dict(rows=rows) if me == 0 else None)


def report(rows) -> None:
    r0 = rows[0]
    print(f"\nDLRM, {len(r0['tables'])} tables {r0['tables']} ({sum(r0['tables']):,} rows) x dim {r0['dim']} "
          f"float32, power-law ids (alpha {r0['alpha']}), {r0['batch_per_rank']} samples per rank; "
          f"median of {r0['steps']} interleaved steps, slowest rank; ms")
    print(f"{'P':>2} {'sharding':<8} {'opt':<5} {'rows/rank':>22} {'touched/rank':>16} "
          f"{'dense: fwd+bwd':>14} {'opt':>7} {'zero':>6} {'step':>7} | {'sparse: fwd+bwd':>15} {'opt':>6} "
          f"{'zero':>5} {'step':>6} | {'speed-up':>8}")
    for r in rows:
        print(f"{r['P']:>2} {r['sharding']:<8} {r['optimizer']:<5} {str(r['owned_rows']):>22} "
              f"{str([round(t) for t in r['touched_rows']]):>16} {r['fwd_bwd_ms_dense']:>14.1f} "
              f"{r['opt_ms_dense']:>7.1f} {r['zero_ms_dense']:>6.1f} {r['step_ms_dense']:>7.1f} | "
              f"{r['fwd_bwd_ms_sparse']:>15.1f} {r['opt_ms_sparse']:>6.2f} {r['zero_ms_sparse']:>5.2f} "
              f"{r['step_ms_sparse']:>6.1f} | {r['speedup']:>7.1f}x")
    print("init (s per rank, sparse model): " + "; ".join(f"P={r['P']} {r['sharding']}: "
                                                       f"{[round(s, 2) for s in r['init_s']]}"
                                                       for r in rows if r["optimizer"] == rows[0]["optimizer"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--procs", default="1,2", help="process counts, one mpiexec job each")
    ap.add_argument("--tables", default="2000000,1000000,500000,200000,50000,10000,1000,100",
                    help="rows per embedding table")
    ap.add_argument("--dim", type=int, default=16, help="embedding width")
    ap.add_argument("--batch", type=int, default=256, help="samples per rank and step")
    ap.add_argument("--alpha", type=float, default=1.05, help="power-law exponent of the ids")
    ap.add_argument("--shardings", default="table,row")
    ap.add_argument("--optimizers", default="adam,sgd", help="adam (lazy when sparse) and/or sgd (plain)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--mpiexec", default=os.environ.get("MPIEXEC", "mpiexec"))
    add_output_args(ap, "bench_embedding")
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return 0
    keys = ("tables", "dim", "batch", "alpha", "shardings", "optimizers", "steps", "warmup")
    rows = (json.load(open(a.from_json))["rows"] if a.from_json else
            rows_over_procs(a, __file__, [x for k in keys for x in (f"--{k}", getattr(a, k))]))
    report(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
