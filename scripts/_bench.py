"""Helpers shared by the benchmark drivers: launch a worker job and read its result, save tables."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def worker_env(threads: int, throttle: bool) -> dict:
    """Environment for a benchmark job: fixed BLAS threads per rank, the repository importable, and
    (throttle) MPICH's yielding progress for oversubscribed ranks (DESIGN.md sec. 5)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if throttle:
        env.update(MPIR_CVAR_CH4_PROGRESS_THROTTLE="1", MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT="1")
    return env


def run_result(cmd: list, env: dict, timeout: float) -> dict:
    """Run a job whose rank 0 prints one ``RESULT {json}`` line; return that object."""
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def emit(result: dict | None) -> None:
    """A worker's side of :func:`run_result` (rank 0 passes its dict, the others None)."""
    if result is not None:
        print("RESULT " + json.dumps(result), flush=True)


def save(out: str, meta: dict, rows: list[dict], tables: dict | None = None) -> None:
    """Write out.json ({meta, rows, **tables}) and out.csv (rows)."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows, **(tables or {})), f, indent=1)
    with open(out + ".csv", "w", newline="") as f:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}.json, {out}.csv", file=sys.stderr)


def timed_steps(world, ddp, opt, loss_fn, x, y, n: int) -> list:
    """Seconds of each of `n` training steps on (x, y), each timed alone after a barrier of the
    world communicator `world` (the median is not smeared by a neighbour's stall)."""
    times = []
    for _ in range(n):
        world.Barrier()
        t = time.perf_counter()
        loss_fn.forward(ddp.forward(x), y)
        ddp.backward(loss_fn.backward())
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return times


def add_output_args(ap, name: str) -> None:
    """The options every benchmark driver shares: where results go, plotting, redrawing, time limit."""
    ap.add_argument("--timeout", type=float, default=600, help="seconds per job")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", name), help="results path without extension")
    ap.add_argument("--plot", action="store_true", help="also draw OUT.png (needs matplotlib: the 'plot' extra)")
    ap.add_argument("--from-json", help="reprint (and --plot) a saved OUT.json instead of measuring")


def saved(a) -> tuple:
    """(the document saved at ``a.from_json``, the path of its plot when --plot, else None)."""
    with open(a.from_json) as f:
        doc = json.load(f)
    return doc, (os.path.splitext(a.from_json)[0] + ".png") if a.plot else None


def rows_over_procs(a, script: str, worker_flags: list, label: str = "P") -> list[dict]:
    """The usual driver: one ``mpiexec -n P script --worker FLAGS`` job per P in ``a.procs``
    (throttled when P exceeds ``a.cores``); returns every job's rows, saved to ``a.out``."""
    rows = []
    for P in (int(p) for p in a.procs.split(",")):
        print(f"{label}={P} ...", file=sys.stderr, flush=True)
        cmd = [a.mpiexec, "-n", str(P), sys.executable, os.path.abspath(script), "--worker", *map(str, worker_flags)]
        rows += run_result(cmd, worker_env(1, P > a.cores), a.timeout)["rows"]
    save(a.out, {k: v for k, v in vars(a).items() if k != "worker"}, rows)
    return rows


class FreeLoss:
    """A loss that costs nothing (0, and a zero gradient of the output's shape): a benchmark of
    the pipeline runtime whose last stage must take no longer than the others - the bubble
    formulas assume equal stages, and a real loss is extra work on the last stage only."""

    def forward(self, out, y) -> float:
        self._shape, self._dtype = out.shape, out.dtype
        return 0.0

    def backward(self):
        return np.zeros(self._shape, self._dtype)

