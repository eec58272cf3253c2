"""Pipeline and tensor-parallel benchmark: bubble per schedule against its formula, live
activations with and without recomputation, communication volume.

    python scripts/bench_pipeline.py --plot           # pp = 2 and 4, every schedule, m = 1..16
    python scripts/bench_pipeline.py --from-json results/bench_pipeline.json --plot

Every pp is one ``mpiexec -n pp`` job (scripts/bench_pipeline.py --worker). Parts:

1. bubble: every stage is a layer whose forward waits --fwd-ms and whose backward 2x that (a timed
   wait, not arithmetic: stage times are then exactly equal, as the formulas assume, and pp = 4
   stages on this 2-core machine do not steal each other's cores - the figure measures the
   *schedule* and its point-to-point traffic; the loss is free by default, --timed-loss: a real
   loss is work on the last stage only). Each schedule in SCHEDULES: gpipe, 1f1b,
   interleaved (--virtual-stages V chunks per rank, each waiting 1/V of the stage's time), zb1 and zb2
   (the backward split into B and W, --fwd-ms each). Measured bubble per stage = 1 - busy / wall of
   a step; the table reports the mean over stages (median over --steps steps) next to the
   schedule's formula (``SCHEDULES[name].bubble``: (p-1)/(m+p-1) for GPipe/1F1B, (p-1)/(Vm+p-1)
   interleaved, (p-1)(F+B-W)/(m(F+B+W)+(p-1)(F+B-W)) ZB-H1, (p-1)F in place of (p-1)(F+B-W) for ZB-H2
   at m >= 2p - 1 and these times) and the bubble the op lists have when
   played with the same op times (``schedules.simulate``: equal to the formula except ZB-H1 at m < p).
2. real pipelines (pp <= cores: one rank per core): an MLP (8 Linear+ReLU units of width --width
   and a head, --mb samples per micro-batch) and a small transformer LM (embedding, 8 blocks of
   width 64, head; 2 sequences of 16 tokens per micro-batch), split by measured unit cost: bubble,
   step time, activation bytes per schedule; for the MLP at the largest m every schedule with
   --recompute none / full / selective: the runtime's own peak of kept activation bytes
   (``Pipeline.stats``) and the seconds spent recomputing. Real stages are not equal: next to the
   formula the table gives the bubble of the op lists *played* with the op times every chunk
   measured (``schedules.simulate``), i.e. the partition's own bubble.

The bubble is 1 - busy / the step's span (earliest stage's first op to the latest stage's last op),
mean over stages - the definition of the formulas and of ``simulate``; "old def" divides by each
stage's own first-to-last op time instead (what this benchmark reported before: it leaves out the
idle tail of the stages that finish first). ZB-H1 against 1F1B: idle time (Qi et al.'s 1/3).
"+h+rt" plays them with that and with every message taking the case's own median hand-off (from
the trace of the same steps): the per-micro-batch costs the formulas take as zero, all measured.
The transports of a case run side by side step by step (mpi's step k, shm's step k, then k + 1).
"+rt" plays the op lists with each stage's own runtime time per op as well (``Pipeline.stats
["runtime_s"]`` over its ops: neither compute nor waiting for a message; ``simulate(overhead=)``):
on the timed stages it accounts for the excess over the formula within a few percent. Part
``cold`` times one op's worth of that runtime work hot and right after --fwd-ms of sleep or spin
(on this VM: ~8 us against ~100 us). ``--fixture spin`` makes the timed op precise (sleep to
--spin-us before its deadline, then spin; --spin-us 1e9: spin throughout) - the fixture before
this option was one ``time.sleep`` (``--fixture sleep``, the default).
3. communication per step: pipeline point-to-point bytes per stage (measured by the runtime), and
   for a tensor-parallel MLP block (tp = pp) the allreduce bytes per step (counted by
   parallel/tensor.py) against Megatron's count for an MLP block: one allreduce of batch x d in the
   forward (g) and one in the backward (f).

4. sharded embeddings (DLRM-style tables, ids from a power law, P = pp ranks, a batch of 8 x --mb per
   rank): the AllToAll bytes per step and rank (ids, rows forward, gradients backward) for
   table-wise and row-wise sharding, counted by parallel/embedding.py, against what the lookups
   would move without de-duplication and against the obvious alternative - replicating the tables
   and allreducing their dense gradient every step.

Peak live activations (micro-batch chunks kept at once, and bytes) are the runtime's own accounting
(Pipeline.stats), per stage, next to each schedule's closed form (``SCHEDULES[name].live``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from _bench import ROOT, FreeLoss, add_output_args, emit, save, worker_env


# ----------------------------------------------------------------------------------- worker
def worker(a) -> None:
    sys.path.insert(0, ROOT)
    import disttrain as dt
    from disttrain import mpi, nn
    from disttrain.data.clicks import power_law_ids
    from disttrain.nn.module import Module
    from disttrain.parallel import tensor
    from disttrain.parallel.embedding import ShardedEmbeddings
    from disttrain.parallel.mesh import Mesh
    from disttrain.parallel.pipeline import SCHEDULES, Pipeline, assign, measure_layer_costs, simulate
    from disttrain.parallel.pipeline.schedules import problem
    from disttrain_zoo.transformer import Transformer

    dt.init()
    P = dt.size()
    mesh = Mesh(pp=P)
    comm = mesh.pp_group.comm
    rows = []
    schedules = a.schedules.split(",")
    transports = a.transport.split(",")

    spin = a.spin_us / 1e6

    def wait(t: float) -> None:
        """The timed op: --fixture sleep is one time.sleep(t) (it returns late by the OS's wake-up,
        ~0.1 ms here, and by a varying amount); --fixture spin sleeps to --spin-us before the
        deadline and spins on the clock from there (ends within microseconds of t)."""
        if a.fixture == "sleep":
            time.sleep(t)
            return
        end = time.perf_counter() + t
        if t > spin:
            time.sleep(t - spin)
        while time.perf_counter() < end:
            pass

    class Timed(Module):
        """A stage (or chunk) with fixed op times (a wait) and a real activation to pass on: forward
        f, backward 2f - split, B f and W f."""

        def __init__(self, f):
            self.f = f

        def forward(self, x):
            wait(self.f)
            self._x = x.copy()
            return self._x

        def backward(self, dy):
            wait(2 * self.f)
            return dy

        def backward_input(self, dy):
            wait(self.f)
            return dy

        def backward_weight(self):
            wait(self.f)

    def timed_loss():
        """The timed stages' loss: --timed-loss free costs nothing, so the last stage's ops take as
        long as every other stage's (the formulas' equal stages); mse (the fixture before the
        seventh round) adds the loss's forward and backward to the last stage's ops only - measured
        here +0.15-0.2 ms on its 10 ms forward, an imbalance that every micro-batch repeats."""
        return FreeLoss() if a.timed_loss == "free" else nn.MSE()

    def run(pipes, x, y, steps):
        """Every stage's measurements of each pipeline in `pipes` over `steps` steps (after
        --warmup), gathered on rank 0: one list per pipeline. The pipelines (one per transport)
        take their steps in turn - step k of each before step k + 1 of any - so that the machine's
        load drifts over all of them alike (side by side, not one after the other).

        The step's span is the same for every stage: from the earliest stage's first op to the
        latest stage's last (the stages' perf_counter stamps: one host), because a stage that
        finishes early still waits for the others before the next step's work reaches it. A
        stage's bubble is 1 - its busy time (compute + recomputation) / the span; its own wall
        (first to last op of that stage alone) is kept as ``own_bubble``: that definition, used
        before, does not count the idle tail of the stages that finish first. A traced pipeline
        (trace=True) also gives the case's hand-offs (``handoffs``: rank 0's median)."""
        got, hand, replay = [[] for _ in pipes], [([], []) for _ in pipes], [[] for _ in pipes]
        for k in range(a.warmup + steps):
            for j, pipe in enumerate(pipes):
                comm.Barrier()
                pipe.step(x if mesh.pp_is_first_stage else None, y if mesh.pp_is_last_stage else None)
                st = pipe.stats
                stamps = comm.allgather((st["t0"], st["t1"]))
                traces = comm.gather(st["trace"], root=0) if pipe.trace else None
                span = max(t1 for _, t1 in stamps) - min(t0 for t0, _ in stamps)
                busy = st["compute_s"] + st["recompute_s"]
                if k >= a.warmup:
                    got[j].append((1 - busy / span, span - busy, span, 1 - busy / (st["t1"] - st["t0"]), st["op_s"],
                                   st["runtime_s"] / st["ops"]))
                    if traces is not None and P > 1:
                        h, q = handoffs(traces, P)
                        hand[j][0].extend(h), hand[j][1].extend(q)
                    if traces is not None:  # this step's ops replayed with their own compute times
                        times = {(s, kind, i, c): t1 - t for s, ops in enumerate(traces)
                                 for kind, i, c, _, t, t1, _ in ops}
                        replay[j].append(simulate(pipe.schedule, P, pipe.m, pipe.v, op_times=times)["bubble"])
        out = []
        for pipe, g, (h, q), rep in zip(pipes, got, hand, replay):
            n, st = pipe.m, pipe.stats
            mine = dict(bubble=float(np.median([r[0] for r in g])), idle_ms=1e3 * float(np.median([r[1] for r in g])),
                        wall_ms=1e3 * float(np.median([r[2] for r in g])),
                        own_bubble=float(np.median([r[3] for r in g])),
                        runtime_ms=1e3 * float(np.median([r[5] for r in g])),
                        op_ms={kind: [1e3 * float(np.mean([r[4][kind][c] for r in g])) / n for c in range(pipe.v)]
                               for kind in "FBW"},
                        peak_live=st["peak_live"], peak_activation_bytes=st["peak_activation_bytes"],
                        p2p_bytes=st["sent_bytes"], recompute_ms=1e3 * st["recompute_s"],
                        handoff_ms=1e3 * float(np.median(h)) if h else 0.0,
                        post_ms=1e3 * float(np.median(q)) if q else 0.0,
                        replay=float(np.median(rep)) if rep else float("nan"))
            out.append(comm.gather(mine, root=0))
        return out

    def chunks_of(name):
        return a.virtual_stages if name == "interleaved" else 1

    def one_way_ms() -> float:
        """A micro-batch's activation from rank 0 to rank 1: half the median round trip of 50
        (the formulas take messages as free; ``played+lat`` adds this per message)."""
        buf, times = np.ones((a.mb, a.width), np.float32), []
        for _ in range(50 if P > 1 else 0):
            comm.Barrier()
            t = time.perf_counter()
            if dt.rank() == 0:
                comm.Send(buf, 1, 7)
                comm.Recv(buf, 1, 7)
            elif dt.rank() == 1:
                comm.Recv(buf, 0, 7)
                comm.Send(buf, 0, 7)
            times.append(time.perf_counter() - t)
        return comm.bcast(1e3 * float(np.median(times)) / 2 if times else 0.0, root=0)

    hop_ms = one_way_ms()

    def record(part, schedule, m, per, recompute="none", transport="mpi") -> None:
        """One table row from every stage's measurements (rank 0 holds them)."""
        if dt.rank() == 0:
            v, fn = chunks_of(schedule), SCHEDULES[schedule]
            f, b, w = (1.0, 1.0, 1.0) if fn.split else (1.0, 2.0, 0.0)
            # the op times each global chunk g = c p + s measured (ms per micro-batch): the
            # schedule played with them is the bubble of *these* stages (unequal when the model's
            # partition is), against which the runtime's own cost shows
            mf, mb, mw = ([per[g % P]["op_ms"][kind][g // P] for g in range(P * v)] for kind in "FBW")
            rows.append(dict(part=part, pp=P, schedule=schedule, V=v, recompute=recompute, m=m, transport=transport,
                             bubble=float(np.mean([s["bubble"] for s in per])),
                             own_bubble=float(np.mean([s["own_bubble"] for s in per])),
                             idle_ms=float(np.mean([s["idle_ms"] for s in per])),
                             theory=fn.bubble(P, m, v, f, b, w),
                             simulated=simulate(schedule, P, m, v, f / v, b / v, w / v)["bubble"],
                             played=simulate(schedule, P, m, v, mf, mb, mw)["bubble"],
                             played_lat=simulate(schedule, P, m, v, mf, mb, mw, latency=hop_ms)["bubble"], hop_ms=hop_ms,
                             # played with each stage's own runtime time per op too (not busy)
                             played_rt=simulate(schedule, P, m, v, mf, mb, mw,
                                                overhead=[s["runtime_ms"] for s in per])["bubble"],
                             # and with every message taking this case's own median hand-off (less the
                             # sender's compute end to send issued: that is in its runtime per op) -
                             # every cost measured: what is left over is not accounted for
                             handoff_us=1e3 * per[0]["handoff_ms"], replay=per[0]["replay"],
                             played_all=simulate(schedule, P, m, v, mf, mb, mw,
                                                 latency=max(0.0, per[0]["handoff_ms"] - per[0]["post_ms"]),
                                                 overhead=[s["runtime_ms"] for s in per])["bubble"],
                             runtime_us=[1e3 * s["runtime_ms"] for s in per], fixture=a.fixture, timed_loss=a.timed_loss,
                             op_ms=dict(F=mf, B=mb, W=mw),
                             live_formula=[fn.live(s, P, m, v) for s in range(P)],
                             step_ms=max(s["wall_ms"] for s in per),
                             **{k: [s[k] for s in per] for k in ("peak_live", "peak_activation_bytes", "p2p_bytes",
                                                                  "recompute_ms")}))

    def runnable(schedule, m):
        return problem(schedule, P, m, chunks_of(schedule)) is None

    # 1. schedule bubble with equal, timed stages
    for schedule in (schedules if "timed" in a.parts else ()):
        v = chunks_of(schedule)
        for m in (m for m in a.micro_batches if runnable(schedule, m)):
            batch = m * a.mb
            x, y = np.ones((batch, a.width), np.float32), np.zeros((batch, a.width), np.float32)
            f = a.fwd_ms / 1e3 / v
            stage = Timed(f) if v == 1 else nn.Sequential(*[Timed(f) for _ in range(v)])
            pipes = [Pipeline(stage, mesh.pp_group, timed_loss() if mesh.pp_is_last_stage else None, schedule=schedule,
                              micro_batches=m, virtual_stages=v, transport=tr, trace=True) for tr in transports]
            for tr, per in zip(transports, run(pipes, x, y, a.steps)):  # side by side, step by step
                record("timed", schedule, m, per, transport=tr)

    # 1c. the hand-off between stages, from the runtime's per-op trace (Pipeline(trace=True)): for
    # every message whose receiver was already waiting for it, the time from the sender's compute
    # end to the receiver's compute start - the runtime's own work on the critical path (the
    # sender's statements before its Isend, MPI's delivery, the receiver's statements before it
    # computes) - and per op the sender's compute end to its send issued ("post")
    for schedule in (schedules if "handoff" in a.parts else ()):
        v, m = chunks_of(schedule), max(a.micro_batches)
        if not runnable(schedule, m) or P == 1:
            continue
        x, y = np.ones((m * a.mb, a.width), np.float32), np.zeros((m * a.mb, a.width), np.float32)
        f = a.fwd_ms / 1e3 / v
        for tr in transports:
            stage = Timed(f) if v == 1 else nn.Sequential(*[Timed(f) for _ in range(v)])
            pipe = Pipeline(stage, mesh.pp_group, timed_loss() if mesh.pp_is_last_stage else None,
                            schedule=schedule, micro_batches=m, virtual_stages=v, trace=True, transport=tr)
            hand, post = [], []
            for k in range(a.warmup + a.steps):
                comm.Barrier()
                pipe.step(x if mesh.pp_is_first_stage else None, y if mesh.pp_is_last_stage else None)
                traces = comm.gather(pipe.stats["trace"], root=0)
                if dt.rank() == 0 and k >= a.warmup:
                    h, q = handoffs(traces, P)
                    hand += h
                    post += q
            if dt.rank() == 0:
                rows.append(dict(part="handoff", pp=P, schedule=schedule, V=v, m=m, messages=len(hand), transport=tr,
                                 handoff_us=1e6 * float(np.median(hand)) if hand else float("nan"),
                                 handoff_p90_us=1e6 * float(np.percentile(hand, 90)) if hand else float("nan"),
                                 post_us=1e6 * float(np.median(post))))

    # 1a. what a pause does to the next op's cost on this machine: one op's worth of runtime work
    # (a 32 KiB copy, a self Isend/Irecv pair, a few dict updates) timed hot (back to back) and
    # right after --fwd-ms of sleeping or of spinning on the clock (the op before it, in the timed
    # fixture) - the same instructions, a cold cache (and, on a VM, a vCPU that was descheduled)
    if "cold" in a.parts and dt.rank() == 0:
        src, dst, me = np.ones((32, 256), np.float32), np.empty((32, 256), np.float32), mpi.MPI.COMM_SELF

        def work():
            r, q = me.Irecv(dst, 0, 9), me.Isend(src, 0, 9)
            r.Wait(), q.Wait()
            d = {}
            for k in range(20):
                d[(k, 1)] = dst.shape == src.shape

        def cost(pause, spin_it=False):
            times = []
            for _ in range(50):
                if pause and spin_it:
                    end = time.perf_counter() + pause
                    while time.perf_counter() < end:
                        pass
                elif pause:
                    time.sleep(pause)
                t = time.perf_counter()
                work()
                times.append(time.perf_counter() - t)
            return 1e6 * float(np.median(times))

        f = a.fwd_ms / 1e3
        rows.append(dict(part="cold", pp=P, schedule="-", m=0, hot_us=cost(0), after_sleep_us=cost(f),
                         after_spin_us=cost(f, True), pause_ms=a.fwd_ms))

    # 1b. runtime work per micro-batch: stages that compute nothing (a 0 ms wait), m = the largest,
    # shape headers on every message (the runtime before known shapes) vs known shapes (no headers,
    # receives posted up front into reused buffers), side by side in one job
    m = max(a.micro_batches)
    x, y = np.ones((m * a.mb, a.width), np.float32), np.zeros((m * a.mb, a.width), np.float32)
    for cache in ((False, True) if "overhead" in a.parts else ()):
        for schedule in ("1f1b", "zb1"):
            pipe = Pipeline(Timed(0.0), mesh.pp_group, timed_loss() if mesh.pp_is_last_stage else None,
                            schedule=schedule, micro_batches=m, cache_shapes=cache)
            per = run([pipe], x, y, 3 * a.steps)[0]
            if dt.rank() == 0:
                rows.append(dict(part="overhead", pp=P, schedule=schedule, m=m, cache_shapes=cache,
                                 us_per_microbatch=1e6 * max(s["wall_ms"] for s in per) / 1e3 / m))

    # 2. real stages split by measured unit cost (meaningful without oversubscription: pp <= cores):
    # an MLP (8 Linear + ReLU units and a head) and a small transformer LM (embedding, 8 blocks, head)
    def real(part, units, sample, batch, recomputes=()):
        """Every schedule at every m on `units` cut into stages by rank 0's measured costs; at the
        largest m also with each recomputation mode. batch(m) -> (x, y) of m micro-batches."""
        costs = comm.bcast(measure_layer_costs(units, sample) if mesh.pp_rank == 0 else None, root=0)

        def one(schedule, m, recompute="none", steps=a.steps):
            v = chunks_of(schedule)
            chunks = [nn.Sequential(*units[lo:hi]) for lo, hi in assign(costs, P, v)[mesh.pp_rank]]
            stage = chunks[0] if v == 1 else nn.Sequential(*chunks)
            x, y = batch(m)
            pipes = [Pipeline(stage, mesh.pp_group, nn.SoftmaxCrossEntropy() if mesh.pp_is_last_stage else None,
                              schedule=schedule, micro_batches=m, virtual_stages=v, recompute=recompute, transport=tr,
                              trace=True) for tr in transports]
            for tr, per in zip(transports, run(pipes, x, y, steps)):  # side by side, step by step
                record(part, schedule, m, per, recompute, tr)
            stage.zero_grad()

        for schedule in schedules:
            for m in (m for m in a.micro_batches if runnable(schedule, m)):
                one(schedule, m)
        m = max(a.micro_batches)
        for schedule in (s for s in schedules if runnable(s, m)):
            for recompute in recomputes:
                one(schedule, m, recompute)

    if P <= a.cores and "mlp" in a.parts:
        rng = np.random.default_rng(0)
        units = [nn.Sequential(nn.Linear(a.width, a.width, rng=rng, input_grad=i > 0), nn.ReLU()) for i in range(8)]
        units.append(nn.Linear(a.width, 10, init="xavier", rng=rng))
        real("mlp", units, np.random.default_rng(1).standard_normal((a.mb, a.width)).astype(np.float32),
             lambda m: (np.random.default_rng(2).standard_normal((m * a.mb, a.width)).astype(np.float32),
                        np.zeros(m * a.mb, np.int64)), ("full", "selective"))
    if P <= a.cores and "transformer" in a.parts:
        vocab, seq, per = 256, 16, max(1, a.mb // 16)  # --mb tokens per micro-batch: 2 sequences of 16
        lm = Transformer(vocab, d=64, heads=4, layers=8, max_len=seq, seed=0)
        ids = np.random.default_rng(3).integers(0, vocab, (max(a.micro_batches) * per, seq + 1))
        real("transformer", lm.blocks(), ids[:per, :-1], lambda m: (ids[:m * per, :-1], ids[:m * per, 1:]))

    # 3. tensor-parallel MLP and attention blocks (tp = pp; the widths must divide by it): allreduce
    # bytes per step, counted
    tp = "tp" in a.parts and (4 * a.width) % P == 0
    blocks = [("mlp", tensor.ParallelMLP(a.width, 4 * a.width, mesh.pp_group, rng=np.random.default_rng(0)),
               np.ones((a.mb * 8, a.width), np.float32)),
              ("attention", tensor.ParallelAttention(a.width, 4 * P, mesh.pp_group, rng=np.random.default_rng(0)),
               np.ones((8, a.mb, a.width), np.float32))] if tp else []
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
    for sharding in (("table", "row") if "emb" in a.parts else ()):
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


def handoffs(traces, p: int) -> tuple:
    """(hand-offs, posts) in seconds from every stage's ``Pipeline.stats["trace"]`` (one host's
    perf_counter): a message from global chunk g (rank g % p, chunk g // p) goes to g + 1 (F) or
    g - 1 (B) for the same micro-batch; its hand-off is the receiver's compute start less the
    sender's compute end, counted when the receiver's op started before the sender's compute ended
    (it was waiting: otherwise the message waited for the receiver, not the other way round)."""
    end, hand, post = {}, [], []
    for s, ops in enumerate(traces):
        for kind, i, c, t_op, t, t1, t2 in ops:
            end[(kind, i, c * p + s)] = t1
            if kind != "W":
                post.append(t2 - t1)
    for s, ops in enumerate(traces):
        for kind, i, c, t_op, t, t1, t2 in ops:
            src = c * p + s + (-1 if kind == "F" else 1)
            sent = end.get((kind, i, src)) if kind != "W" else None
            if sent is not None and t_op < sent:
                hand.append(t - sent)
    return hand, post


# ----------------------------------------------------------------------------------- driver
def report(rows) -> None:
    print(f"\n{'part':<6} {'pp':>2} {'schedule':<11} {'tr':<3} {'V':>1} {'recompute':<9} {'m':>3} {'bubble':>7} {'formula':>7} "
          f"{'diff':>6} {'played':>7} {'diff':>6} {'+lat':>7} {'+rt':>7} {'diff':>6} {'+h+rt':>7} {'diff':>6} {'h us':>5} {'replay':>7} {'diff':>6} {'rt us/op':>9} {'old def':>7} {'idle':>8} {'step':>8} {'peak live / stage':>18} "
          f"{'formula':>14} {'peak act. KiB / stage':>24} {'recompute ms':>14} {'p2p KiB / stage':>18}")
    for r in rows:
        if r["part"] in ("tp", "emb", "overhead", "cold", "handoff"):
            continue
        rel = (r["bubble"] - r["theory"]) / r["theory"] if r["theory"] else 0.0
        played = r.get("played", r["theory"])
        relp = (r["bubble"] - played) / played if played else 0.0
        print(f"{r['part']:<6} {r['pp']:>2} {r['schedule']:<11} {r.get('transport', 'mpi'):<3} {r.get('V', 1):>1} {r.get('recompute', 'none'):<9} "
              f"{r['m']:>3} {r['bubble']:>7.3f} {r['theory']:>7.3f} {rel:>+6.0%} {played:>7.3f} {relp:>+6.0%} "
              f"{r.get('played_lat', played):>7.3f} {r.get('played_rt', played):>7.3f} "
              f"{(r['bubble'] - r.get('played_rt', played)) / r.get('played_rt', played) if r.get('played_rt', played) else 0:>+6.0%} "
              f"{r.get('played_all', played):>7.3f} "
              f"{(r['bubble'] - r.get('played_all', played)) / r.get('played_all', played) if r.get('played_all', played) else 0:>+6.0%} "
              f"{r.get('handoff_us', 0):>5.0f} {r.get('replay', float('nan')):>7.3f} "
              f"{(r['bubble'] - r.get('replay', 0)) / r['replay'] if r.get('replay') else float('nan'):>+6.0%} "
              f"{np.mean(r.get('runtime_us', [0])):>9.0f} "
              f"{r.get('own_bubble', r['bubble']):>7.3f} {r.get('idle_ms', 0):>5.1f} ms {r['step_ms']:>5.0f} ms "
              f"{r['peak_live']!s:>18} {r.get('live_formula', '-')!s:>14} "
              f"{[round(b / 1024) for b in r['peak_activation_bytes']]!s:>24} "
              f"{[round(t) for t in r.get('recompute_ms', [])]!s:>14} "
              f"{[round(b / 1024) for b in r['p2p_bytes']]!s:>18}")
    hops = ", ".join(sorted({f"pp {r['pp']}: {1e3 * r.get('hop_ms', 0):.0f} us" for r in rows if "hop_ms" in r}))
    print("bubble: 1 - busy / the step's span (earliest first op to latest last op over the stages), mean over "
          "stages; formula: SCHEDULES[name].bubble for equal stages; played: the op lists played with the op times "
          "each stage measured (schedules.simulate); +lat: played with every message taking the measured one-way "
          f"time ({hops}); +rt: played with each stage's own runtime time per op too (Pipeline.stats['runtime_s'] "
          "per op: between its first and last op, neither compute nor waiting for a message; rt us/op: its mean "
          "over stages); +h+rt: played with that runtime per op and every message taking the case's own median "
          "hand-off (h: a sender's compute end to its waiting receiver's compute start, from the trace) less the "
          "sender's compute end to send issued (in its runtime already); replay: each step's op lists played "
          "with every op's own compute time from its trace and nothing else (median over steps): replay - formula "
          "is what the ops' unequal and jittered times cost, bubble - replay what the runtime between them costs; old def: 1 - busy / each stage's own first-to-last op; idle: span - busy, mean over stages")
    over = [r for r in rows if r["part"] == "overhead"]
    for r in (r for r in over if r["cache_shapes"]):
        base = next(b for b in over if not b["cache_shapes"] and b["pp"] == r["pp"] and b["schedule"] == r["schedule"])
        print(f"runtime work, pp={r['pp']} {r['schedule']} m={r['m']}, stages computing nothing: "
              f"{base['us_per_microbatch']:.0f} us per micro-batch with shape headers, {r['us_per_microbatch']:.0f} us "
              f"with known shapes (receives posted up front): {r['us_per_microbatch'] / base['us_per_microbatch']:.2f}x")
    for r in (r for r in rows if r["part"] == "handoff"):
        print(f"hand-off, pp={r['pp']} {r['schedule']} m={r['m']} {r.get('transport', 'mpi')}: {r['handoff_us']:.0f} us median "
              f"(p90 {r['handoff_p90_us']:.0f}) from a sender's compute end to its waiting receiver's compute "
              f"start over {r['messages']} messages; compute end to send issued {r['post_us']:.0f} us")
    for r in (r for r in rows if r["part"] == "cold"):
        print(f"one op's runtime work (32 KiB copy, self Isend/Irecv, 20 dict stores), pp={r['pp']} job: "
              f"{r['hot_us']:.0f} us hot, {r['after_sleep_us']:.0f} us after {r['pause_ms']:g} ms of sleep, "
              f"{r['after_spin_us']:.0f} us after {r['pause_ms']:g} ms of spinning (a cold cache)")
    timed = [r for r in rows if r["part"] == "timed"]
    for pp, m, tr in sorted({(r["pp"], r["m"], r.get("transport", "mpi")) for r in timed}):
        got = {r["schedule"]: r for r in timed if r["pp"] == pp and r["m"] == m and r.get("transport", "mpi") == tr}
        for zb in (name for name in ("zb1", "zb2") if name in got and "1f1b" in got and got["1f1b"]["bubble"] > 0):
            z, o = got[zb], got["1f1b"]
            print(f"pp={pp} m={m} {tr}: {zb} / 1f1b idle time {z.get('idle_ms', 0) / max(1e-9, o.get('idle_ms', 0)):.2f} "
                  f"(formula {IDLE_RATIO(z, o):.2f}: Qi et al.'s 1/3, (p-1)(F+B-W) against (p-1)(F+B+W), "
                  f"for F = B = W); as a fraction of the step {z['bubble'] / o['bubble']:.2f}")
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


def IDLE_RATIO(zb: dict, flush: dict) -> float:
    """A zero-bubble row's idle time over 1F1B's by their formulas ("theory": F = B = W for the
    split schedules, B = 2F for 1F1B - the same work, so the ratio of bubble / (1 - bubble)): 1/3
    for ZB-H1 at m >= p and for ZB-H2 at m >= 2p - 1."""
    return (zb["theory"] / (1 - zb["theory"])) / (flush["theory"] / (1 - flush["theory"]))


def plot(rows, out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r["part"] == "timed"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    marks = dict(gpipe="o", zb1="^", zb2="v", interleaved="D")
    for pp in sorted({r["pp"] for r in timed}):
        for sched in dict.fromkeys(r["schedule"] for r in timed):
            rs = [r for r in timed if r["pp"] == pp and r["schedule"] == sched]
            line = axes[0].plot([r["m"] for r in rs], [r["bubble"] for r in rs], marks.get(sched, "s") + "-",
                                label=f"{sched} pp={pp}")[0]
            axes[0].plot([r["m"] for r in rs], [r["theory"] for r in rs], ":", lw=1, color=line.get_color())
            axes[1].plot([r["m"] for r in rs], [max(r["peak_live"]) for r in rs], marks.get(sched, "s") + "-",
                         label=f"{sched} pp={pp}")
    axes[0].set(xscale="log", xlabel="micro-batches m", ylabel="bubble fraction",
                title="pipeline bubble, timed equal stages: measured (lines) vs formula (dotted)")
    axes[1].set(xscale="log", xlabel="micro-batches m", ylabel="peak live micro-batch chunks (max stage)",
                title="activation memory")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=120)
    print(f"wrote {out}.png", file=sys.stderr)


THROTTLE = ("MPIR_CVAR_CH4_PROGRESS_THROTTLE", "MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT")


def job_env(a, P: int) -> dict:
    """One pp job's environment. MPICH's progress throttle (a usleep(1) - about 55 us with the
    kernel's timer slack - whenever a waiting rank polls without progress) is what oversubscribed
    ranks need to leave their core to the peer (DESIGN.md sec. 5); with one rank per core it only
    delays every message a waiting stage receives, so --throttle auto drops it there, even when the
    caller's environment sets it."""
    on = a.throttle == "on" or (a.throttle == "auto" and P > a.cores)
    env = worker_env(1, on)
    if not on:
        for k in THROTTLE:
            env.pop(k, None)
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--procs", default="2,4", help="pipeline depths to run")
    ap.add_argument("--parts", default="timed,overhead,mlp,transformer,tp,emb",
                    help="which parts to run: timed (equal timed stages), cold (one op's runtime work hot vs after a pause), "
                         "handoff (the runtime's per-op trace: sender's compute end to waiting receiver's compute start), overhead (stages computing nothing), "
                         "mlp, transformer (real stages, pp <= cores), tp, emb")
    ap.add_argument("--schedules", default="gpipe,1f1b,interleaved,zb1,zb2", help="pipeline schedules to run")
    ap.add_argument("--transport", default="mpi,shm",
                    help="Pipeline transports, run side by side for every case: mpi, shm (shared-memory channel)")
    ap.add_argument("--virtual-stages", type=int, default=2, help="chunks per rank of the interleaved schedule")
    ap.add_argument("--micro-batches", default="1,2,4,8,16")
    ap.add_argument("--mb", type=int, default=32, help="samples per micro-batch")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--fwd-ms", type=float, default=10.0, help="timed stage: forward ms (backward: 2x)")
    ap.add_argument("--fixture", choices=("sleep", "spin"), default="sleep",
                    help="timed stage's wait: one time.sleep (the fixture of every earlier round), or sleep to "
                         "--spin-us before the deadline then spin (precise)")
    ap.add_argument("--spin-us", type=float, default=500.0, help="--fixture spin: microseconds spun at the end")
    ap.add_argument("--timed-loss", choices=("free", "mse"), default="free",
                    help="the timed stages' loss: free (costs nothing: equal stages) or mse (extra work on the last stage)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--throttle", choices=("auto", "on", "off"), default="auto",
                    help="MPICH's progress throttle: auto = only when pp > --cores (oversubscribed)")
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
            print(f"pp={P} (MPICH progress throttle {'on' if 'MPIR_CVAR_CH4_PROGRESS_THROTTLE' in job_env(a, P) else 'off'}) ...",
                  file=sys.stderr, flush=True)
            cmd = [a.mpiexec, "-n", str(P), sys.executable, os.path.abspath(__file__), "--worker",
                   "--micro-batches", ",".join(map(str, a.micro_batches)),
                   "--schedules", a.schedules, "--transport", a.transport, "--parts", a.parts, "--virtual-stages", str(a.virtual_stages), "--mb", str(a.mb), "--width", str(a.width),
                   "--fwd-ms", str(a.fwd_ms), "--fixture", a.fixture, "--timed-loss", a.timed_loss, "--spin-us", str(a.spin_us), "--steps", str(a.steps), "--warmup", str(a.warmup), "--cores",
                   str(a.cores), "--tables", a.tables, "--dim", str(a.dim), "--alpha", str(a.alpha)]
            out = subprocess.run(cmd, env=job_env(a, P), capture_output=True, text=True,
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
