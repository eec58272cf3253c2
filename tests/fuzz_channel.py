"""Pipeline shared-memory channel fuzzer (attack8), run by hand - not in the suite.

    mpiexec -n P python tests/fuzz_channel.py SEED COUNT      # DISTTRAIN_FAKE_NODES=... for nodes

Every rank draws the same configurations from SEED: a schedule (gpipe, 1f1b, interleaved with
V 2-3, zb1), m in {1, 2, 3, p, p + 1, 2p}, recomputation, uneven micro-batches, a model of uneven
widths, transport="shm" - and where the pipelines live: over the world; on two groups of the same
ranks at once; two pipelines on ONE group (they share its window pool); on a group in reversed
rank order; a dp x pp mesh with DataParallel (two pp groups of the same size, each with its
channel). Each runs 3-6 steps whose batch sizes change at random (the channel is laid out again,
its windows grow or are reused), with evaluation (`predict`, headers on MPI) between steps; groups
are freed and garbage collected between configurations. Every step's loss and every parameter
gradient must equal ONE process on the global batch (float64, rtol 1e-9). Prints one line per
configuration on rank 0 and, per rank, "N configurations clean, K known-shape steps through the
channel" (K = 0 means the channel was not exercised: every pair on another node).
"""
import gc
import sys

import numpy as np

import disttrain as dt
from disttrain import nn, optim
from disttrain.parallel.mesh import Mesh
from disttrain.parallel.pipeline import Pipeline, assign
from disttrain.parallel.pipeline.schedules import problem

D, C, TOL = 6, 4, 1e-9


def units(n, seed):
    """n units of uneven widths (Linear + activation) and a Linear head, float64."""
    rng = np.random.default_rng(seed)
    sizes = [D] + [3 + (5 * i) % 7 for i in range(n - 1)] + [C]
    out = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b, rng=rng, dtype=np.float64, input_grad=i > 0)
        out.append(lin if i == n - 1 else nn.Sequential(lin, [nn.ReLU, nn.Tanh, nn.GELU][i % 3]()))
    return out


def sgd(params):
    return optim.SGD(params, lr=0.1, momentum=0.9)


class Job:
    """One pipeline on `pp_group` (data-parallel over `dp_group` if given) and its one-process twin."""

    def __init__(self, rng, seed, pp_group, dp_group=None):
        p = pp_group.size
        while True:
            sched = str(rng.choice(["gpipe", "1f1b", "interleaved", "zb1"]))
            v = int(rng.integers(2, 4)) if sched == "interleaved" else 1
            m = int(rng.choice([1, 2, 3, p, p + 1, 2 * p]))
            if not problem(sched, p, m, v):
                break
        rec, self.uneven = str(rng.choice(["none", "full", "selective"])), bool(rng.integers(2))
        self.cfg = (sched, m, v, rec, self.uneven)
        n = p * v + int(rng.integers(0, 2))
        mine, self.ref = units(n, seed), nn.Sequential(*units(n, seed))
        nn.Sequential(*mine).parameters()  # the global names before the cut
        chunks = [nn.Sequential(*mine[a:b]) for a, b in assign([1.0] * n, p, v)[pp_group.rank]]
        self.stage = nn.Sequential(*chunks) if v > 1 else chunks[0]
        self.dp, self.dp_rank = (dp_group.size, dp_group.rank) if dp_group is not None else (1, 0)
        mod = dt.DataParallel(self.stage, group=dp_group, bucket_mb=0.001) if self.dp > 1 else self.stage
        last = pp_group.rank == p - 1
        self.pipe = Pipeline(mod, pp_group, nn.SoftmaxCrossEntropy() if last else None, sched, micro_batches=m,
                             virtual_stages=v, recompute=rec, uneven=self.uneven, transport="shm")
        self.opt, self.ref_opt, self.loss = sgd(self.stage.parameters()), sgd(self.ref.parameters()), nn.SoftmaxCrossEntropy()
        self.through_channel = 0

    def batch(self, rng):
        m = self.cfg[1]
        per = int(rng.choice([m, 2 * m + self.uneven, 3 * m])) if rng.random() < 0.4 else 2 * m + self.uneven
        return rng.standard_normal((self.dp * per, D)), rng.integers(0, C, self.dp * per), per

    def step(self, rng, k):
        x, y, per = self.batch(rng)
        pipe, rows = self.pipe, slice(self.dp_rank * per, (self.dp_rank + 1) * per)
        if rng.random() < 0.15 and self.dp == 1:  # evaluation between steps: headers, on every rank
            np.testing.assert_allclose(pipe.predict(x if pipe.is_first else None), self.ref.forward(x), rtol=TOL, atol=1e-12)
            return
        got = pipe.step(x[rows] if pipe.is_first else None, y[rows] if pipe.is_last else None)
        self.through_channel += bool(pipe.net._inbound)
        want = self.loss.forward(self.ref.forward(x), y)
        self.ref.backward(self.loss.backward())
        ref = {q.name: q for q in self.ref.parameters()}
        for q in self.stage.parameters():
            np.testing.assert_allclose(q.grad, ref[q.name].grad, rtol=TOL, atol=1e-12, err_msg=f"{self.cfg} step {k} {q.name}")
        if self.dp == 1:  # with dp the loss is this replica's (the gradients above are the global ones)
            assert abs(got - want) <= TOL * max(1.0, abs(want)), (self.cfg, k, got, want)
        self.opt.step(), self.opt.zero_grad(), self.ref_opt.step(), self.ref_opt.zero_grad()


def configuration(rng, seed, world):
    """(what, jobs, groups to free) for one configuration."""
    P = world.size
    mode = int(rng.integers(5))
    if mode == 0:
        return "world", [Job(rng, seed, world)], []
    if mode == 1:
        g1, g2 = dt.new_group(range(P)), dt.new_group(range(P))
        return "two groups of the same ranks", [Job(rng, seed, g1), Job(rng, seed + 1, g2)], [g1, g2]
    if mode == 2:
        g = dt.new_group(range(P))
        return "two pipelines on one group", [Job(rng, seed, g), Job(rng, seed + 1, g)], [g]
    if mode == 3 or P < 4:
        g = dt.new_group(list(range(P))[::-1])
        return "reversed group", [Job(rng, seed, g)], [g]
    mesh = Mesh(dp=2, pp=P // 2) if P % 2 == 0 else Mesh(dp=1, pp=P)
    return f"mesh dp {mesh.dp} x pp {mesh.pp}", [Job(rng, seed, mesh.pp_group, mesh.dp_group)], []


def main():
    world = dt.init()
    seed0, count = int(sys.argv[1]), int(sys.argv[2])
    clean = through = 0
    for seed in range(seed0, seed0 + count):
        rng = np.random.default_rng(seed)  # the same draws on every rank
        what, jobs, groups = configuration(rng, seed, world)
        for k in range(int(rng.integers(3, 7))):
            for job in jobs:
                job.step(rng, k)
        through += sum(j.through_channel for j in jobs)
        if world.rank == 0:
            print(f"seed {seed}: {what}: {[j.cfg for j in jobs]} ok", flush=True)
        del jobs
        if rng.random() < 0.5:
            gc.collect()  # windows of dead channels: free for reuse (agreed by the pool's MIN)
        if rng.random() < 0.7:
            for g in groups:
                g.free()
        clean += 1
    print(f"rank {world.rank}: {clean} configurations clean, {through} known-shape steps through the channel", flush=True)


if __name__ == "__main__":
    main()
