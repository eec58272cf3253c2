"""The pipeline runtime's own work per op (issue 19, item 4): this tree against an older one.

    git worktree add /tmp/base <older commit>      # e.g. the merge base of this branch
    python scripts/bench_pipeline_overhead.py --baseline /tmp/base
    # writes results/bench_pipeline_overhead.{json,csv}

Stages of --blocks blocks of 4 identity layers (each keeps its input, as real layers keep an
activation: the stash has something to do) and a loss that costs nothing, m = --micro-batches, so
a step's time is the runtime's bookkeeping - the compiled op program, the stash and its restore,
the accounting, the step's agreement calls - and, at --procs 2, the point-to-point messages
(known shapes, receives posted up front) and the wait for the peer. Each tree runs in its own
job (``mpiexec -n P``, one process per pipeline stage, P <= cores: no oversubscription), the two
alternating --rounds times, so machine noise hits both sides; each job reports its best-of-5
microseconds per op - wall (a step's wall over the stage's op count, the slowest stage) and CPU
(the main thread's CPU time: at pp = 1 the runtime's own work, much less sensitive to other
processes on the machine than the wall; at pp = 2 it includes polling for the peer) and the
Python function calls per op of one profiled step (exact) - the table the
median over rounds and the ratio baseline / this tree. Without --baseline only this tree is run.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import subprocess
import sys
import time

import numpy as np
from _bench import ROOT, FreeLoss, add_output_args, emit, run_result, save, worker_env


def worker(a) -> None:
    # the tree under test comes first on the path (the driver sets PYTHONPATH); imported here,
    # not at the top, because which disttrain that is depends on the job
    import disttrain as dt
    from disttrain import nn
    from disttrain.nn.module import Module
    from disttrain.parallel.mesh import Mesh
    from disttrain.parallel.pipeline import Pipeline

    class Identity(Module):
        def forward(self, x):
            self._x = x  # a cached activation, as real layers keep one
            return x

        def backward(self, dy):
            return dy

    dt.init()
    mesh = Mesh(pp=dt.size())
    comm, m = mesh.pp_group.comm, a.micro_batches
    x, y = np.ones((2 * m, 8), np.float32), np.zeros(2 * m)
    rows = []
    for schedule in a.schedules.split(","):
        v = 2 if schedule == "interleaved" else 1

        def chunk():
            return nn.Sequential(*[nn.Sequential(*[Identity() for _ in range(4)]) for _ in range(a.blocks)])

        stage = chunk() if v == 1 else nn.Sequential(*[chunk() for _ in range(v)])
        pipe = Pipeline(stage, mesh.pp_group, FreeLoss() if mesh.pp_is_last_stage else None, schedule, m,
                        virtual_stages=v)
        best, cpu = np.inf, np.inf
        for rep in range(5 + 2):
            comm.Barrier()
            t, c = time.perf_counter(), time.thread_time()
            for _ in range(a.steps):
                pipe.step(x, y)
            took = max(comm.allgather(time.perf_counter() - t)) / a.steps / len(pipe.ops)
            used = max(comm.allgather(time.thread_time() - c)) / a.steps / len(pipe.ops)
            if rep >= 2:  # two warm-up repeats
                best, cpu = min(best, took), min(cpu, used)
        prof = cProfile.Profile()  # Python calls per op: exact, whatever else runs on the machine
        prof.enable()
        pipe.step(x, y)
        prof.disable()
        calls = pstats.Stats(prof).total_calls / len(pipe.ops)
        rows.append(dict(schedule=schedule, V=v, ops=len(pipe.ops), us_per_op=1e6 * best, cpu_us_per_op=1e6 * cpu,
                         calls_per_op=max(comm.allgather(calls))))
    emit(dict(rows=rows) if dt.rank() == 0 else None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--baseline", help="a checkout of an older tree to compare against (its disttrain/)")
    ap.add_argument("--procs", default="1,2", help="pipeline depths (one process per stage)")
    ap.add_argument("--blocks", type=int, default=6, help="blocks of 4 identity layers per chunk")
    ap.add_argument("--micro-batches", type=int, default=16)
    ap.add_argument("--schedules", default="1f1b,interleaved,zb1")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--mpiexec", default=os.environ.get("MPIEXEC", "mpiexec"))
    add_output_args(ap, "bench_pipeline_overhead")
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return 0
    trees = {"this": ROOT, **({"baseline": os.path.abspath(a.baseline)} if a.baseline else {})}
    got = {}
    for r in range(a.rounds):
        for P in (int(p) for p in a.procs.split(",")):
            for name, tree in trees.items():
                env = worker_env(1, P > (os.cpu_count() or 1))
                env["PYTHONPATH"] = tree + os.pathsep + os.environ.get("PYTHONPATH", "")
                cmd = [a.mpiexec, "-n", str(P), sys.executable, os.path.abspath(__file__), "--worker",
                       "--micro-batches", str(a.micro_batches), "--blocks", str(a.blocks),
                       "--schedules", a.schedules, "--steps", str(a.steps)]
                for row in run_result(cmd, env, a.timeout)["rows"]:
                    sides = got.setdefault((P, row["schedule"], row["ops"]), {})
                    sides.setdefault(name, []).append(row["us_per_op"])
                    sides.setdefault(name + "_cpu", []).append(row["cpu_us_per_op"])
                    sides.setdefault(name + "_calls", []).append(row["calls_per_op"])
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    rows = []
    for (P, schedule, ops), sides in got.items():
        us = {k: float(np.median(v)) for k, v in sides.items()}
        row = dict(pp=P, schedule=schedule, m=a.micro_batches, ops=ops, layers=5 * a.blocks + 1,
                   us_per_op=us["this"], cpu_us_per_op=us["this_cpu"], calls_per_op=us["this_calls"])
        if "baseline" in us:
            row.update(baseline_us_per_op=us["baseline"], baseline_cpu_us_per_op=us["baseline_cpu"],
                       baseline_calls_per_op=us["baseline_calls"],
                       speedup=us["baseline"] / us["this"], cpu_speedup=us["baseline_cpu"] / us["this_cpu"])
        rows.append(row)
        line = f"pp={P} {schedule:<11} m={a.micro_batches} ({ops} ops per stage and step): "
        for kind, sfx in (("wall", ""), ("CPU", "_cpu"), ("Python calls", "_calls")):
            base, this = us.get("baseline" + sfx), us["this" + sfx]
            unit = "" if sfx == "_calls" else " us"
            line += (f"{kind} {this:.1f}{unit} per op" if base is None else
                     f"{kind} baseline {base:.1f} -> {this:.1f}{unit} per op ({base / this:.2f}x)") + "; "
        print(line.rstrip("; "))
    save(a.out, dict({k: v for k, v in vars(a).items() if k != "worker"}, load=os.getloadavg()), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
