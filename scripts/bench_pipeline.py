"""Pipeline and tensor-parallel benchmark: bubble fraction, live activations, communication volume.

    python scripts/bench_pipeline.py --plot           # pp = 2 and 4, both schedules, m = 1..16
    python scripts/bench_pipeline.py --from-json results/bench_pipeline.json --plot

Every pp is one ``mpiexec -n pp`` job (scripts/bench_pipeline.py --worker). Three parts:

1. bubble: every stage is a layer whose forward waits --fwd-ms and whose backward 2x that (a timed
   wait, not arithmetic: stage times are then exactly equal, as the (p-1)/(m+p-1) formula assumes,
   and pp = 4 stages on this 2-core machine do not steal each other's cores - the figure measures
   the *schedule* and its point-to-point traffic). Measured bubble per stage = 1 - busy / wall of
   a step; the table reports the mean over stages (median over --steps steps) next to theory.
2. a real pipeline: an MLP (8 Linear+ReLU layers of width --width) split by measured layer cost,
   pp = 2 (one rank per core): bubble, step time, activation bytes.
3. communication per step: pipeline point-to-point bytes per stage (measured by the runtime), and
   for a tensor-parallel MLP block (tp = pp) the allreduce bytes per step (counted by
   parallel/tensor.py) against Megatron's count for an MLP block: one allreduce of batch x d in the
   forward (g) and one in the backward (f).

4. sharded embeddings (DLRM-style tables, ids from a power law, P = pp ranks, a batch of 8 x --mb per
   rank): the AllToAll bytes per step and rank (ids, rows forward, gradients backward) for
   table-wise and row-wise sharding, counted by parallel/embedding.py, against what the lookups
   would move without de-duplication and against the obvious alternative - replicating the tables
   and allreducing their dense gradient every step.

Peak live activations (micro-batches alive at once, and bytes) are the runtime's own accounting
(Pipeline.stats), per stage.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from _bench import ROOT, add_output_args, emit, save, worker_env


# ----------------------------------------------------------------------------------- worker
def worker(a) -> None:
    sys.path.insert(0, ROOT)
    import disttrain as dt
    from disttrain import nn
    from disttrain.data.clicks import power_law_ids
    from disttrain.nn.module import Module
    from disttrain.parallel import tensor
    from disttrain.parallel.embedding import ShardedEmbeddings
    from disttrain.parallel.mesh import Mesh
    from disttrain.parallel.pipeline import (
        Pipeline,
        bubble_fraction,
        measure_layer_costs,
        partition,
    )

    dt.init()
    P = dt.size()
    mesh = Mesh(pp=P)
    comm = mesh.pp_group.comm
    rows = []

    class Timed(Module):
        """A stage with fixed forward/backward times (a wait) and a real activation to pass on."""

        def __init__(self, f):
            self.f = f

        def forward(self, x):
            time.sleep(self.f)
            self._x = x.copy()
            return self._x

        def backward(self, dy):
            time.sleep(2 * self.f)
            return dy

    def run(pipe, x, y, steps):
        walls, busys, stats = [], [], None
        for _ in range(a.warmup + steps):
            comm.Barrier()
            pipe.step(x if mesh.pp_is_first_stage else None, y if mesh.pp_is_last_stage else None)
            walls.append(pipe.stats["wall_s"])
            busys.append(pipe.stats["compute_s"])
            stats = dict(pipe.stats)
        w, b = np.array(walls[a.warmup:]), np.array(busys[a.warmup:])
        mine = dict(bubble=float(np.median(1 - b / w)), wall_ms=1e3 * float(np.median(w)),
                    peak_live=stats["peak_live"], peak_activation_bytes=stats["peak_activation_bytes"],
                    p2p_bytes=stats["sent_bytes"])
        return comm.gather(mine, root=0)

    def record(part, schedule, m, per) -> None:
        """One table row from every stage's measurements (rank 0 holds them)."""
        if dt.rank() == 0:
            rows.append(dict(part=part, pp=P, schedule=schedule, m=m, bubble=float(np.mean([s["bubble"] for s in per])),
                             theory=bubble_fraction(P, m), step_ms=max(s["wall_ms"] for s in per),
                             **{k: [s[k] for s in per] for k in ("peak_live", "peak_activation_bytes", "p2p_bytes")}))

    # 1. schedule bubble with equal, timed stages
    for schedule in ("gpipe", "1f1b"):
        for m in a.micro_batches:
            batch = m * a.mb
            x, y = np.ones((batch, a.width), np.float32), np.zeros((batch, a.width), np.float32)
            pipe = Pipeline(Timed(a.fwd_ms / 1e3), mesh.pp_group, nn.MSE() if mesh.pp_is_last_stage else None,
                            schedule=schedule, micro_batches=m)
            record("timed", schedule, m, run(pipe, x, y, a.steps))

    # 2. a real MLP split by measured layer cost (meaningful without oversubscription: pp <= cores)
    if P <= a.cores:
        rng = np.random.default_rng(0)
        layers = []
        for i in range(8):
            layers += [nn.Linear(a.width, a.width, rng=rng, input_grad=i > 0), nn.ReLU()]
        layers.append(nn.Linear(a.width, 10, init="xavier", rng=rng))
        sample = np.random.default_rng(1).standard_normal((a.mb, a.width)).astype(np.float32)
        costs = comm.bcast(measure_layer_costs(layers, sample) if mesh.pp_rank == 0 else None, root=0)
        lo, hi = partition(costs, P)[mesh.pp_rank]
        stage = nn.Sequential(*layers[lo:hi])
        for schedule in ("gpipe", "1f1b"):
            for m in a.micro_batches:
                x = np.random.default_rng(2).standard_normal((m * a.mb, a.width)).astype(np.float32)
                y = np.zeros(m * a.mb, np.int64)
                pipe = Pipeline(stage, mesh.pp_group, nn.SoftmaxCrossEntropy() if mesh.pp_is_last_stage else None,
                                schedule=schedule, micro_batches=m)
                record("mlp", schedule, m, run(pipe, x, y, max(3, a.steps // 2)))
                stage.zero_grad()

    # 3. tensor-parallel MLP and attention blocks: allreduce bytes per step, counted
    blocks = [("mlp", tensor.ParallelMLP(a.width, 4 * a.width, mesh.pp_group, rng=np.random.default_rng(0)),
               np.ones((a.mb * 8, a.width), np.float32)),
              ("attention", tensor.ParallelAttention(a.width, 4 * P, mesh.pp_group, rng=np.random.default_rng(0)),
               np.ones((8, a.mb, a.width), np.float32))]
    for name, blk, x in blocks:
        tensor.stats.reset()
        t = time.perf_counter()
        for _ in range(a.steps):
            blk.backward(np.ones_like(blk.forward(x)))
        took = (time.perf_counter() - t) / a.steps
        if dt.rank() == 0:
            rows.append(dict(part="tp", pp=P, schedule="-", m=0, tp_allreduce_bytes=tensor.stats.bytes / a.steps,
                             tp_allreduces=tensor.stats.calls / a.steps, theory_bytes=2 * x.nbytes,
                             step_ms=1e3 * took, block=name))

    # 4. sharded embeddings: AllToAll volume per step
    sizes = [int(v) for v in a.tables.split(",")]
    batch = 8 * a.mb
    for sharding in ("table", "row"):
        emb = ShardedEmbeddings(sizes, a.dim, mesh.pp_group, sharding, rng=np.random.default_rng(0))
        rng = np.random.default_rng(100 + dt.rank())
        perms = [np.random.default_rng(t).permutation(n) for t, n in enumerate(sizes)]
        steps = [np.stack([power_law_ids(rng, batch, n, a.alpha, perm) for n, perm in zip(sizes, perms)], axis=1)
                 for _ in range(a.warmup + a.steps)]
        times = []
        for i, ids in enumerate(steps):
            if i == a.warmup:
                emb.stats.reset()
            comm.Barrier()
            t = time.perf_counter()
            out = emb.forward(ids)
            emb.backward(np.ones_like(out))
            times.append(time.perf_counter() - t)
        st = {k: v / a.steps for k, v in emb.stats.as_dict().items()}
        per = comm.gather(dict(st, ms=1e3 * float(np.median(times[a.warmup:])), rows=emb.owned_rows()), root=0)
        if dt.rank() == 0:
            item = 4
            rows.append(dict(part="emb", pp=P, schedule=sharding, m=0, batch_per_rank=batch, tables=sizes, dim=a.dim,
                             alpha=a.alpha, lookups=st["lookups"],
                             id_bytes=[r["id_bytes"] for r in per], fwd_bytes=[r["fwd_bytes"] for r in per],
                             bwd_bytes=[r["bwd_bytes"] for r in per], owned_rows=[r["rows"] for r in per],
                             step_ms=max(r["ms"] for r in per),
                             no_dedup_bytes=st["lookups"] * (8 + 2 * a.dim * item),
                             replicated_allreduce_bytes=2 * (P - 1) / P * sum(sizes) * a.dim * item))
    emit(dict(rows=rows) if dt.rank() == 0 else None)


# ----------------------------------------------------------------------------------- driver
def report(rows) -> None:
    print(f"\n{'part':<6} {'pp':>2} {'schedule':<6} {'m':>3} {'bubble':>7} {'theory':>7} {'diff':>6} {'step':>8} "
          f"{'peak live / stage':>18} {'peak act. KiB / stage':>24} {'p2p KiB / stage':>20}")
    for r in rows:
        if r["part"] in ("tp", "emb"):
            continue
        rel = (r["bubble"] - r["theory"]) / r["theory"] if r["theory"] else 0.0
        print(f"{r['part']:<6} {r['pp']:>2} {r['schedule']:<6} {r['m']:>3} {r['bubble']:>7.3f} {r['theory']:>7.3f} "
              f"{rel:>+6.0%} {r['step_ms']:>5.0f} ms {r['peak_live']!s:>18} "
              f"{[round(b / 1024) for b in r['peak_activation_bytes']]!s:>24} "
              f"{[round(b / 1024) for b in r['p2p_bytes']]!s:>20}")
    for r in rows:
        if r["part"] == "tp":
            print(f"tensor-parallel {r.get('block', 'mlp')} block, tp = {r['pp']}: {r['tp_allreduces']:.0f} allreduces, "
                  f"{r['tp_allreduce_bytes'] / 1024:.0f} KiB per step (Megatron's count: one batch x d allreduce forward, one backward = {r['theory_bytes'] / 1024:.0f} KiB), "
                  f"{r['step_ms']:.1f} ms per forward+backward")
    emb = [r for r in rows if r["part"] == "emb"]
    if emb:
        r0 = emb[0]
        print(f"\nsharded embeddings: {len(r0['tables'])} tables {r0['tables']} x dim {r0['dim']}, power-law ids "
              f"(alpha {r0['alpha']}), {r0['batch_per_rank']} samples per rank; KiB per step and rank (mean over ranks)")
        print(f"{'P':>2} {'sharding':<8} {'rows/rank':>18} {'ids':>7} {'fwd':>7} {'bwd':>7} {'total':>8} {'no dedup':>9} "
              f"{'vs':>6} {'allreduce':>10} {'vs':>6} {'step':>8}")
        for r in emb:
            tot = np.mean(np.add(np.add(r["id_bytes"], r["fwd_bytes"]), r["bwd_bytes"]))
            print(f"{r['pp']:>2} {r['schedule']:<8} {r['owned_rows']!s:>18} {np.mean(r['id_bytes']) / 1024:>7.1f} "
                  f"{np.mean(r['fwd_bytes']) / 1024:>7.1f} {np.mean(r['bwd_bytes']) / 1024:>7.1f} {tot / 1024:>8.1f} "
                  f"{r['no_dedup_bytes'] / 1024:>9.1f} {r['no_dedup_bytes'] / tot:>5.1f}x "
                  f"{r['replicated_allreduce_bytes'] / 1024:>10.0f} {r['replicated_allreduce_bytes'] / tot:>5.0f}x "
                  f"{r['step_ms']:>5.1f} ms")


def plot(rows, out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for pp in sorted({r["pp"] for r in rows if r["part"] == "timed"}):
        for sched, mark in (("gpipe", "o"), ("1f1b", "s")):
            rs = [r for r in rows if r["part"] == "timed" and r["pp"] == pp and r["schedule"] == sched]
            axes[0].plot([r["m"] for r in rs], [r["bubble"] for r in rs], mark + "-", label=f"{sched} pp={pp}")
            axes[1].plot([r["m"] for r in rs], [max(r["peak_live"]) for r in rs], mark + "-",
                         label=f"{sched} pp={pp}")
        rs = [r for r in rows if r["part"] == "timed" and r["pp"] == pp and r["schedule"] == "gpipe"]
        axes[0].plot([r["m"] for r in rs], [r["theory"] for r in rs], "k:", lw=1,
                     label=f"(p-1)/(m+p-1), p={pp}")
    axes[0].set(xscale="log", xlabel="micro-batches m", ylabel="bubble fraction",
                title="pipeline bubble: measured (lines) vs theory (dotted)")
    axes[1].set(xscale="log", xlabel="micro-batches m", ylabel="peak live micro-batches (max stage)",
                title="activation memory")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=120)
    print(f"wrote {out}.png", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--procs", default="2,4", help="pipeline depths to run")
    ap.add_argument("--micro-batches", default="1,2,4,8,16")
    ap.add_argument("--mb", type=int, default=32, help="samples per micro-batch")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--fwd-ms", type=float, default=10.0, help="timed stage: forward ms (backward: 2x)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--mpiexec", default=os.environ.get("MPIEXEC", "mpiexec"))
    ap.add_argument("--tables", default="100000,50000,20000,10000,5000,1000,500,100", help="embedding table rows")
    ap.add_argument("--dim", type=int, default=32, help="embedding width")
    ap.add_argument("--alpha", type=float, default=1.05, help="power-law exponent of the ids")
    add_output_args(ap, "bench_pipeline")
    a = ap.parse_args()
    a.micro_batches = [int(m) for m in str(a.micro_batches).split(",")]
    if a.worker:
        worker(a)
        return 0
    if a.from_json:
        rows = json.load(open(a.from_json))["rows"]
    else:
        rows = []
        for P in (int(p) for p in a.procs.split(",")):
            print(f"pp={P} ...", file=sys.stderr, flush=True)
            cmd = [a.mpiexec, "-n", str(P), sys.executable, os.path.abspath(__file__), "--worker",
                   "--micro-batches", ",".join(map(str, a.micro_batches)), "--mb", str(a.mb), "--width", str(a.width),
                   "--fwd-ms", str(a.fwd_ms), "--steps", str(a.steps), "--warmup", str(a.warmup), "--cores",
                   str(a.cores), "--tables", a.tables, "--dim", str(a.dim), "--alpha", str(a.alpha)]
            out = subprocess.run(cmd, env=worker_env(1, P > a.cores), capture_output=True, text=True,
                                 timeout=a.timeout)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not lines:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
            rows += json.loads(lines[-1][7:])["rows"]
        save(a.out, {k: v for k, v in vars(a).items() if k != "worker"}, rows)
    report(rows)
    if a.plot:
        plot(rows, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
