"""ZeRO benchmark: what each rank keeps, its peak RSS, step time and bytes sent, per shard mode.

    python scripts/bench_zero.py                       # P = 1, 2, 4; MLP of 50.4 M fp32 parameters
    python scripts/bench_zero.py --procs 2 --layers 4  # smaller
    python scripts/bench_zero.py --from-json results/bench_zero.json

Every (P, mode) is its own job (peak RSS is per process), run in rounds - none, optimizer,
gradients, full, none, ... - so that the machine's load drifts over all modes alike; the step time
of a mode is its median over the rounds' timed steps, and ``vs_none`` divides it by "none"'s at
the same P (side by side, the same noise). Model: MLP [W] * (L + 1) + [10] in float32 (L layers of
W x W plus the head), Adam, a synthetic batch of --batch samples per rank.

Reported per rank (rank 0; ranks differ by at most one element per bucket):
  param/grad/optim MB   DataParallel.memory() between steps (what DataParallel and the optimizer keep)
  peak_transient MB     the most whole-unit parameters + gradients held at once (gradients/full)
  peak_rss MB           the process's peak resident set (ru_maxrss): model, data, buffers, Python, MPI
  step_s, vs_none       median step time, and its ratio to "none" at the same P
  sent MB, vs_ddp       bytes each rank sent per step (ring volumes: allreduce 2(P-1)/P n, reduce-scatter
                        and allgather (P-1)/P n each), and the ratio to "none" - ZeRO's 1x / 1x / 1.5x
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys

import numpy as np

from _bench import ROOT, add_output_args, emit, run_result, save, timed_steps, worker_env

MODES = ("none", "optimizer", "gradients", "full")
MB = 1e6


def worker(a) -> None:
    sys.path.insert(0, ROOT)
    import disttrain as dt
    from disttrain import nn, optim
    from disttrain_zoo.mlp import MLP

    dt.init()
    r = dt.rank()
    rng = np.random.default_rng(1 + r)
    x = rng.standard_normal((a.batch, a.width)).astype(np.float32)
    y = rng.integers(0, 10, a.batch)
    model, loss_fn = MLP([a.width] * (a.layers + 1) + [10]), nn.SoftmaxCrossEntropy()
    n_params = sum(p.data.size for p in model.parameters())
    ddp = dt.DataParallel(model, shard=a.mode, algorithm=a.algorithm)
    opt = ddp.make_optimizer(optim.Adam, lr=1e-4)
    timed_steps(dt.world().comm, ddp, opt, loss_fn, x, y, a.warmup)
    sent0 = ddp.wire_stats["sent_bytes"]
    times = timed_steps(dt.world().comm, ddp, opt, loss_fn, x, y, a.steps)
    mem = ddp.memory()
    sent = (ddp.wire_stats["sent_bytes"] - sent0) / a.steps
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    emit(dict(mode=a.mode, procs=dt.size(), params=n_params, step_times=times, sent_bytes=sent,
              peak_rss=rss, **mem) if r == 0 else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", default="1,2,4", help="process counts")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=12, help="hidden W x W layers (12 x 2048^2: 50.4 M parameters)")
    ap.add_argument("--batch", type=int, default=16, help="samples per rank")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per job")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="jobs per (P, mode), interleaved over the modes")
    ap.add_argument("--algorithm", default="ring",
                    help="every mode's collectives (allreduce / reduce-scatter / allgather): ring by default, since "
                         "MPICH's in-place Allgatherv that 'auto' picks with the default cost model was ~100x slower "
                         "than the ring here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    add_output_args(ap, "bench_zero")
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    if a.from_json:
        rows = json.load(open(a.from_json))["rows"]
    else:
        rows = measure(a)
        save(a.out, {"command": " ".join(sys.argv), "width": a.width, "layers": a.layers, "batch": a.batch,
                     "steps": a.steps, "rounds": a.rounds, "algorithm": a.algorithm}, rows)
    print_table(rows)


def measure(a) -> list:
    env = worker_env(1, throttle=True)
    raw = {}
    for p in (int(v) for v in a.procs.split(",")):
        for _ in range(a.rounds):
            for mode in a.modes.split(","):
                cmd = ["mpiexec", "-n", str(p), sys.executable, os.path.abspath(__file__), "--worker", "--mode", mode,
                       "--width", str(a.width), "--layers", str(a.layers), "--batch", str(a.batch),
                       "--steps", str(a.steps), "--warmup", str(a.warmup), "--algorithm", a.algorithm]
                res = run_result(cmd, env, a.timeout)
                print(f"P={p} {mode}: {statistics.median(res['step_times']):.3f} s/step", file=sys.stderr, flush=True)
                raw.setdefault((p, mode), []).append(res)
    rows = []
    for (p, mode), runs in raw.items():
        last = runs[-1]
        rows.append(dict(procs=p, mode=mode, params=last["params"], param_mb=last["parameters"] / MB,
                         grad_mb=last["gradients"] / MB, optim_mb=last["optimizer"] / MB,
                         peak_transient_mb=last["peak_transient"] / MB,
                         peak_rss_mb=max(r["peak_rss"] for r in runs) / MB,
                         step_s=statistics.median(t for r in runs for t in r["step_times"]),
                         sent_mb=statistics.median(r["sent_bytes"] for r in runs) / MB))
    for row in rows:
        base = next((b for b in rows if b["procs"] == row["procs"] and b["mode"] == "none"), None)
        row["vs_none"] = row["step_s"] / base["step_s"] if base else None
        row["vs_ddp_bytes"] = row["sent_mb"] / base["sent_mb"] if base and base["sent_mb"] else None
    return rows


def print_table(rows) -> None:
    cols = ["procs", "mode", "param_mb", "grad_mb", "optim_mb", "peak_transient_mb", "peak_rss_mb", "step_s",
            "vs_none", "sent_mb", "vs_ddp_bytes"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{r[c]:.3g}" if isinstance(r[c], float) else ("-" if r[c] is None else str(r[c])) for c in cols]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
