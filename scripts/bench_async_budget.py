"""Side by side: synchronous data parallelism vs the asynchronous parameter servers (``--sync
async``, whose ``--steps`` is a global update budget) against a persistent straggler.

    python scripts/bench_async_budget.py --procs 4 --straggler-sleep 0.01 --repeats 2 --out results/async_budget
    python scripts/bench_async_budget.py --networks shm,link --rate 1gbit ...   # link: emulated hosts (root)

Each repeat runs the main job (digits MLP) once per mode, interleaved (drift and the neighbours'
load hit both alike), with one rank sleeping ``--straggler-sleep`` seconds after every backward
(the ``train-step`` fault point, ``DISTTRAIN_FAULT_ACTION=sleep:S``). Both modes evaluate the
same number of gradients: sync N steps of the global batch, async N x P pushes of one rank's
share, spent by whichever workers are fast (Dean et al. 2012). Reported per run: the job's wall
time (start-up included, the same for both), rank 0's training time to the first evaluation at
or above ``--target`` test accuracy, the final accuracy, the steps each worker did, and the
straggler's sleep relative to a step's compute (sync's ``compute_s``). Output: a table on stdout,
OUT.json / OUT.csv (rows per run and the median ratio async / sync).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _bench import save, worker_env
from bench_compression import launcher


def one_run(a, net: str, mode: str, tmp: str, rep: int) -> dict:
    path = os.path.join(tmp, f"{net}-{mode}-{rep}.jsonl")
    cmd = launcher(net, a) + ["-m", "disttrain.train", "--sync", mode, "--steps", str(a.steps), "--seed", str(a.seed),
                              "--eval-every", str(a.eval_every), "--log-every", str(a.eval_every), "--metrics", path]
    env = worker_env(1, throttle=net == "shm")
    env.update(DISTTRAIN_FAULT_INJECT="train-step", DISTTRAIN_FAULT_RANK=str(a.straggler_rank),
               DISTTRAIN_FAULT_ACTION=f"sleep:{a.straggler_sleep}")
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
    wall = time.perf_counter() - t
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    recs = [json.loads(ln) for ln in open(path) if ln.strip()]
    final = next(r for r in recs if r.get("final"))
    evals = [r for r in recs if "test_accuracy" in r and not r.get("final")]
    hit = next((r for r in evals if r["test_accuracy"] >= a.target), None)
    logged = [r for r in recs if "loss" in r]
    return dict(network=net, mode=mode, repeat=rep, wall_s=wall, train_time_s=logged[-1]["train_time_s"],
                time_to_target_s=hit["train_time_s"] if hit else None, step_at_target=hit["step"] if hit else None,
                final_test_accuracy=final["test_accuracy"], compute_s=statistics.median(r["compute_s"] for r in logged),
                steps_per_worker=final.get("steps_per_worker", [a.steps] * a.procs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--networks", default="shm", help="shm (one host) and/or link (emulated hosts; root)")
    ap.add_argument("--rate", default="1gbit", help="emulated link rate, tc syntax")
    ap.add_argument("--modes", default="sync,async")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--straggler-rank", type=int, default=None, help="default: the last rank")
    ap.add_argument("--straggler-sleep", type=float, default=0.01, help="seconds per step")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", default="results/async_budget")
    a = ap.parse_args()
    a.straggler_rank = a.procs - 1 if a.straggler_rank is None else a.straggler_rank
    load = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.repeats):
            for net in a.networks.split(","):
                for mode in a.modes.split(","):
                    r = one_run(a, net, mode, tmp, rep)
                    rows.append(r)
                    tt = f"{r['time_to_target_s']:.1f}" if r["time_to_target_s"] is not None else "never"
                    print(f"{net:4s} {mode:6s} rep {rep}: wall {r['wall_s']:6.1f} s | train {r['train_time_s']:6.1f} s"
                          f" | to {a.target:.0%} {tt} s (step {r['step_at_target']}) | acc "
                          f"{r['final_test_accuracy']:.4f} | compute {1e3 * r['compute_s']:.2f} ms/step | "
                          f"steps {r['steps_per_worker']}", flush=True)
    ratios = {}
    for net in a.networks.split(","):
        base = {r["repeat"]: r for r in rows if r["network"] == net and r["mode"] == "sync"}
        for mode in a.modes.split(","):
            mine = [r for r in rows if r["network"] == net and r["mode"] == mode]
            ratios[f"{net}/{mode}"] = {k: statistics.median(r[k] / base[r["repeat"]][k] for r in mine)
                                       for k in ("wall_s", "train_time_s") if base}
            print(f"{net}/{mode}: median wall / sync {ratios[f'{net}/{mode}'].get('wall_s', float('nan')):.2f}, "
                  f"train time / sync {ratios[f'{net}/{mode}'].get('train_time_s', float('nan')):.2f}")
    meta = dict(vars(a), loadavg_before=load, loadavg_after=os.getloadavg(), python=sys.version.split()[0])
    save(a.out, meta, rows, {"ratios": ratios})


if __name__ == "__main__":
    main()
