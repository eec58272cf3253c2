"""Elastic restart cost: launchers/elastic.sh vs restarting by hand, side by side.

    python scripts/bench_elastic.py                      # 4 -> 3 ranks, 3 repetitions
    python scripts/bench_elastic.py --repeat 1 --steps 200

Three ways to run the same main job (MLP on digits, float64, --checkpoint-every 10), interleaved
in each repetition so that the machine's load hits all of them:

- ``clean``: uninterrupted, ``mpiexec -n 4``;
- ``manual``: the obvious alternative to the launcher - ``mpiexec -n 4`` with rank 2 SIGKILLed in
  its --kill-at-th step (disttrain/faults.py), then by hand ``mpiexec -n 3 ... --resume``;
- ``elastic``: the same failure under ``launchers/elastic.sh --max-ranks 4``, which notices,
  attributes, cleans up and relaunches on 3 ranks by itself.

Reported: wall seconds of each, ``elastic / manual`` (what the launcher's automation costs: the
rank wrapper, the failure attribution, the two ``python -m disttrain.elastic`` questions) and
``elastic - clean`` (what a failure costs in all: teardown, relaunch, redone steps). Results go to
results/bench_elastic.{json,csv}.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from _bench import ROOT, add_output_args, save, worker_env

ELASTIC = os.path.join(ROOT, "launchers", "elastic.sh")


def _job(d: str, steps: int) -> list:
    return [sys.executable, "-m", "disttrain.train", "--hidden", "64", "--dtype", "float64", "--steps", str(steps),
            "--global-batch-size", "48", "--log-every", "50", "--checkpoint-every", "10",
            "--checkpoint-dir", os.path.join(d, "ck"), "--metrics", os.path.join(d, "m.jsonl")]


def _timed(cmd: list, env: dict, timeout: float, ok=(0,)) -> float:
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode not in ok:
        raise RuntimeError(f"{' '.join(cmd)}: status {res.returncode}\n{res.stdout[-1500:]}\n{res.stderr[-2500:]}")
    return time.perf_counter() - t


def measure(steps: int, kill_at: int, timeout: float) -> dict:
    env = dict(worker_env(1, True), DISTTRAIN_COSTMODEL="defaults",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    fault = dict(env, DISTTRAIN_FAULT_INJECT="train-step", DISTTRAIN_FAULT_AT=str(kill_at), DISTTRAIN_FAULT_RANK="2")
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    row = {}
    with tempfile.TemporaryDirectory() as d:
        row["clean_s"] = _timed([mpiexec, "-n", "4", *_job(d, steps)], env, timeout)
    with tempfile.TemporaryDirectory() as d:
        t = _timed([mpiexec, "-n", "4", *_job(d, steps)], fault, timeout, ok=(9, 137))  # killed: mpiexec's status
        row["manual_s"] = t + _timed([mpiexec, "-n", "3", *_job(d, steps), "--resume"], env, timeout)
    with tempfile.TemporaryDirectory() as d:
        row["elastic_s"] = _timed(["bash", ELASTIC, "--max-ranks", "4", "--", *_job(d, steps)],
                                  dict(fault, TMPDIR=d), timeout)
    row["elastic_over_manual"] = row["elastic_s"] / row["manual_s"]
    row["failure_cost_s"] = row["elastic_s"] - row["clean_s"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--kill-at", type=int, default=155, help="rank 2 dies in this step (after the checkpoint of 150)")
    ap.add_argument("--repeat", type=int, default=3)
    add_output_args(ap, "bench_elastic")
    a = ap.parse_args()
    rows = []
    for r in range(a.repeat):
        rows.append(dict(repeat=r, **measure(a.steps, a.kill_at, a.timeout)))
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    med = {k: float(np.median([x[k] for x in rows])) for k in rows[0] if k != "repeat"}
    print("median: " + " ".join(f"{k}={v:.3f}" for k, v in med.items()))
    save(a.out, dict(steps=a.steps, kill_at=a.kill_at, ranks="4 -> 3", cores=os.cpu_count(), median=med), rows)


if __name__ == "__main__":
    main()
