"""The pipeline runtime's own work per op (issue 19, item 4), without peers to wait for.

    python scripts/bench_pipeline_overhead.py          # writes results/bench_pipeline_overhead.{json,csv}

One process, pp = 1: a stage of --blocks blocks of 4 identity layers (no compute) and a loss that
costs nothing, so a step's time is the runtime's bookkeeping - splitting the batch, stashing and
restoring each micro-batch's layer state, accounting, the step's agreement calls. Side by side in
one run, alternating --rounds times: the stash planned once per chunk (``stash.Plan``: modules
listed once, structural attributes classified once per module) against the obvious alternative,
the module tree walked and every attribute classified on every op (what the runtime did before).
Reports the median over rounds of each side's best-of-5 microseconds per op, and their ratio.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from _bench import ROOT, add_output_args, save

sys.path.insert(0, ROOT)
import disttrain as dt  # noqa: E402  (the repository's, after the path insert)
from disttrain import nn  # noqa: E402
from disttrain.nn.module import Module  # noqa: E402
from disttrain.parallel.mesh import Mesh  # noqa: E402
from disttrain.parallel.pipeline import Pipeline  # noqa: E402
from disttrain.parallel.pipeline import stash as S  # noqa: E402


class Identity(Module):
    def forward(self, x):
        self._x = x  # a cached activation, as real layers keep one
        return x

    def backward(self, dy):
        return dy


class FreeLoss:
    def forward(self, out, y):
        self._shape = out.shape
        return 0.0

    def backward(self):
        return np.zeros(self._shape, np.float32)


class Walking:
    """The alternative: the chunk's module tree walked, and every attribute classified, per op."""

    def __init__(self, chunk):
        self.chunk = chunk

    @property
    def modules(self):
        return list(self.chunk.modules())

    @property
    def split(self):
        return [m for m in self.chunk.modules() if m.weight_state]

    def skip(self, m, d):
        return frozenset(k for k, v in d.items() if k.startswith("__") or S._structural(v))


def per_op(pipe, x, y, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        pipe.step(x, y)
    return (time.perf_counter() - t) / steps / len(pipe.ops)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=6, help="blocks of 4 identity layers in the stage")
    ap.add_argument("--micro-batches", type=int, default=16)
    ap.add_argument("--schedules", default="1f1b,zb1")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    add_output_args(ap, "bench_pipeline_overhead")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dt.init()
    mesh = Mesh(pp=1)
    m = a.micro_batches
    x, y = np.ones((2 * m, 8), np.float32), np.zeros(2 * m)
    rows = []
    for schedule in a.schedules.split(","):
        stage = nn.Sequential(*[nn.Sequential(*[Identity() for _ in range(4)]) for _ in range(a.blocks)])
        pipe = Pipeline(stage, mesh.pp_group, FreeLoss(), schedule, m)
        planned, walking = pipe._plans, [Walking(c) for c in pipe.chunks]
        per_op(pipe, x, y, 3)
        got = {"planned": [], "walking": []}
        for _ in range(a.rounds):
            for name, plans in (("planned", planned), ("walking", walking)):
                pipe._plans = plans
                got[name].append(min(per_op(pipe, x, y, a.steps) for _ in range(5)))
        us = {k: 1e6 * float(np.median(v)) for k, v in got.items()}
        rows.append(dict(schedule=schedule, m=m, layers=4 * a.blocks + a.blocks + 1, ops=len(pipe.ops),
                         planned_us_per_op=us["planned"], walking_us_per_op=us["walking"],
                         speedup=us["walking"] / us["planned"]))
        print(f"{schedule}: {us['walking']:.0f} us per op walking the modules, {us['planned']:.0f} us planned: "
              f"{us['walking'] / us['planned']:.2f}x ({len(pipe.ops)} ops per step, {rows[-1]['layers']} modules)")
    save(a.out, dict(vars(a), load=os.getloadavg()), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
