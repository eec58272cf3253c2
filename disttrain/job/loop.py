"""The main job's loop: agree on the configuration, set up, resume, train, log, evaluate,
checkpoint, finish. ``main`` reads as the loop; each step of it is a function below."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

import disttrain as dt
from disttrain import faults, stall, timeline
from disttrain.comm.errors import CollectiveError
from disttrain.parallel.embedding import ShardedEmbeddings
from disttrain.parallel.sync import make as make_sync
from disttrain.workloads import gradient_scale, train_step

from .config import ConfigError, TrainConfig, parse_config
from .metrics import Interval, comm_summary, merge_sync, sync_summary
from .resume import checkpoint_failed, restore, save_checkpoint, truncate_metrics
from .setup import PipelineForward, build, setup
from .straggler import Straggler


@dataclass
class Run:
    """Everything the loop carries from step to step."""

    cfg: TrainConfig
    mesh: object
    work: object
    model: object
    opt: object
    sched: object
    ddp: object
    pipe: object = None
    model_parallel: bool = False
    start: int = 0
    log: object = None
    iv: Interval = None
    skipped: int = 0  # non-finite steps skipped so far
    consecutive: int = 0  # ... in a row
    t_start: float = field(default_factory=time.perf_counter)
    eval_s: float = 0.0  # evaluation time, excluded from train_time_s
    warned_comm: bool = False
    sync: object = None  # the --sync mode (parallel/sync)
    straggler: object = None  # --straggler (job/straggler.py)

    @property
    def rank0(self) -> bool:
        return dt.rank() == 0


def main(argv=None) -> int:
    """Run the main job; returns the exit status (module docstring of disttrain.train)."""
    cfg = _agreed_config(argv)
    if not isinstance(cfg, TrainConfig):
        return cfg
    run = _prepare(cfg)
    if not isinstance(run, Run):
        return run
    step = run.start
    while run.sync.more(run, step):  # --steps, or the servers' global update budget (--sync async)
        finite = _train_step(run, step)
        done = step = step + 1
        code = _count_nonfinite(run, done, finite)
        if code is not None:
            return code
        if done % cfg.log_every == 0 or not run.sync.more(run, done):
            _log(run, done)
        if cfg.eval_every and done % cfg.eval_every == 0:
            _evaluate(run, done)
        code = _checkpoint_or_stop(run, done)
        if code is not None:
            return code
    return _finish(run)


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _agreed_config(argv):
    """The configuration, or exit status 2 on every rank. Every rank parsed the same flags, but
    files (config, metrics directory) may look different on another host: the ranks agree, so that
    all stop together with one message (rank 0's, or the lowest failing rank's) and nobody proceeds
    into a collective the others never join. A configuration valid on every rank but different on
    one (e.g. --sync local:2 in one host's --config file, sync in another's) is an error too: the
    ranks would build different groups and hang in their first collective."""
    try:
        cfg, err = parse_config(argv), None
    except ConfigError as e:
        cfg, err = None, str(e)
    dt.init()
    every = dt.world().comm.allgather((err, None if cfg is None else vars(cfg)))
    bad = [(r, e) for r, (e, _) in enumerate(every) if e]
    if not bad:  # valid everywhere, but the same? (a --config file that differs on one host)
        bad = [(r, "the configuration differs between ranks (a --config file or flags that differ per host): "
                   + "; ".join(f"{k}: rank 0 has {v!r}, rank {r} has {c[k]!r}" for k, v in every[0][1].items()
                               if c[k] != v))
               for r, (_, c) in enumerate(every) if c != every[0][1]]
    if bad:
        if dt.rank() == 0:
            r, e = bad[0]
            _err(f"disttrain.train: configuration error{f' (on rank {r})' if r else ''}: {e}")
        return 2
    return cfg


def _prepare(cfg: TrainConfig):
    """Mesh, workload, model, optimizer, DataParallel (and pipeline), resume: a Run, or exit status 2."""
    try:
        mesh, work, model = setup(cfg)
    except (ValueError, CollectiveError) as e:  # decided from the configuration and the world size:
        if dt.rank() == 0:  # the same verdict on every rank, so all stop
            _err(f"disttrain.train: configuration error: {e}")
        return 2
    dt.broadcast_parameters(model, group=mesh.dp_group)  # replicas of the same shard agree
    try:  # decided from the configuration and the world size: the same verdict on every rank
        sync = make_sync(cfg.sync, cfg)
        group = sync.dp_group(mesh)
        straggler = Straggler(cfg.straggler, dt.rank(), dt.size())
    except ValueError as e:
        if dt.rank() == 0:
            _err(f"disttrain.train: configuration error: {e}")
        return 2
    ddp = dt.DataParallel(model, bucket_mb=cfg.bucket_mb, compression=cfg.compression, algorithm=cfg.algorithm,
                          overlap=cfg.overlap, group=group, shard=cfg.shard)
    opt, sched = build(cfg, ddp)  # over this rank's stage (all layers unless pipelined), or its ZeRO shards
    pipe = None
    if mesh.pp > 1:
        pipe = dt.Pipeline(ddp, mesh.pp_group, work.loss_fn if mesh.pp_is_last_stage else None, cfg.schedule,
                           cfg.micro_batches, virtual_stages=cfg.virtual_stages, recompute=cfg.recompute,
                           uneven=True)  # fixed batches divide (setup checks); sentences under a token budget need not
    # stages, tensor shards and embedding shards hold different parameters on different ranks
    model_parallel = mesh.pp * mesh.tp > 1 or not all(p.replicated for p in model.parameters())
    run = Run(cfg, mesh, work, model, opt, sched, ddp, pipe, model_parallel, sync=sync, straggler=straggler)
    sync.start(run)
    resumed = None
    if cfg.resume:
        try:
            run.start, resumed = restore(run)
        except ConfigError as e:
            if run.rank0:
                _err(f"disttrain.train: {e}")
            return 2
    if cfg.timeline:
        timeline.start(cfg.timeline)
    if run.start and cfg.metrics and run.rank0:
        truncate_metrics(cfg.metrics, run.start, warn=_err)
    run.log = open(cfg.metrics, "a" if run.start else "w") if (cfg.metrics and run.rank0) else None
    if run.rank0:
        print(f"[disttrain] {dt.size()} ranks (dp {mesh.dp} x pp {mesh.pp} x tp {mesh.tp}"
              f"{f', {cfg.schedule} with {cfg.micro_batches} micro-batches' if pipe else ''}) | {work.description} | "
              f"{cfg.steps} steps | {cfg.optimizer} lr {cfg.lr} | compression {cfg.compression}", flush=True)
    run.iv = Interval(ddp, run.start)
    if run.start and resumed:  # continue the skip counters and the logging interval the checkpoint was taken in
        run.skipped, run.consecutive = resumed["skipped"], resumed["consecutive"]
        run.iv = Interval(ddp, resumed["interval_start"], resumed["loss_sum"], resumed["count"])
    return run


def _train_step(run: Run, step: int) -> bool:
    """One optimizer step; False if the gradients were not finite (the step is skipped and the
    compressor's state rolled back)."""
    batch, ddp, mesh = run.work.batch(step), run.ddp, run.mesh
    with timeline.span("step", "step", step=step + 1):
        t, e = time.perf_counter(), ddp.exposed_comm_seconds + ddp.handoff_seconds
        if run.pipe:
            loss = run.pipe.step(batch.inputs if mesh.pp_is_first_stage else None,
                                 batch.targets if mesh.pp_is_last_stage else None, gradient_scale(batch, mesh.dp))
        else:
            loss = train_step(ddp, run.work.loss_fn, batch, mesh.dp)
        faults.point("train-step")  # tests: a rank dies mid-training (after its backward, before the update)
        wait = ddp.exposed_comm_seconds + ddp.handoff_seconds - e
        run.straggler.delay(time.perf_counter() - t - wait)  # --straggler: this rank computes FACTOR x slower
        run.iv.add(loss, batch, time.perf_counter() - t - wait, wait)
        finite = run.sync.update(run, step)  # parallel/sync: apply the step as --sync says
    run.sched.step()
    return finite


def _count_nonfinite(run: Run, done: int, finite: bool):
    """Count skipped steps; exit status 3 (on every rank: the verdict is the same everywhere) when
    --on-nonfinite stop, or more than --max-skipped-steps in a row."""
    cfg = run.cfg
    run.consecutive = 0 if finite else run.consecutive + 1
    if finite:
        return None
    run.skipped += 1
    why = None
    if cfg.on_nonfinite == "stop":
        why = (f"disttrain.train: step {done}: non-finite (NaN/Inf) gradients; stopping before they are applied "
               "(--on-nonfinite stop). Lower --lr or check the data.")
    elif run.consecutive > cfg.max_skipped_steps:
        why = (f"disttrain.train: step {done}: {run.consecutive} steps in a row had non-finite (NaN/Inf) gradients "
               f"(more than --max-skipped-steps {cfg.max_skipped_steps}): the run has diverged; stopping. Lower --lr, "
               "add --warmup-steps or check the data.")
    if why:
        if run.rank0 or not run.sync.agreed_verdict:  # a verdict of this rank's own: it says why
            _err(why if run.sync.agreed_verdict else f"{why} (rank {dt.rank()}; --sync {cfg.sync} judges each "
                 "rank's gradients on their own)")
        timeline.stop()
        return 3
    if run.rank0 or not run.sync.agreed_verdict:
        _err(f"[disttrain] warning: step {done}: non-finite (NaN/Inf) gradients; step skipped "
             f"({run.skipped} so far, {run.consecutive} in a row)")
    return None


def _log(run: Run, done: int) -> None:
    """The metrics record and progress line of the interval ending at `done`."""
    cfg, unit = run.cfg, run.work.unit
    rec = run.iv.record(done, unit, run.opt, run.skipped, alone=not run.sync.collective_metrics)
    emb = getattr(run.model, "embeddings", None)
    if isinstance(emb, ShardedEmbeddings):  # this rank's AllToAll bytes per step (ids, rows, grads)
        st = emb.stats
        rec["embedding_alltoall_bytes"] = (st.id_bytes + st.fwd_bytes + st.bwd_bytes) / max(1, run.iv.steps)
        st.reset()
    if run.pipe:  # this step's idle share per rank (pipeline bubble + waiting), and live activations
        st = dt.world().comm.allgather(run.pipe.stats)
        rec["pipeline_idle"] = [round(1 - x["compute_s"] / x["wall_s"], 4) for x in st]
        rec["pipeline_peak_live"] = [x["peak_live"] for x in st]
    merge_sync(rec, run.sync.record())
    rec["train_time_s"] = time.perf_counter() - run.t_start - run.eval_s
    if run.rank0:
        extra = (f" | padding {rec['padding']:.0%} imbalance {rec['imbalance']:.2f} | sync wait "
                 f"{1e3 * max(rec['sync_wait_s']):.0f} ms" if "padding" in rec else "")
        # parameter servers with a global budget: the servers' step leads, this worker's own follows
        shown = rec.get("global_step", done)
        servers = f" | this worker's step {done}" if "global_step" in rec else ""
        if "comm_accounting" in rec and not run.warned_comm:
            run.warned_comm = True
            _err(f"[disttrain] warning: DataParallel reported more exposed communication "
                 f"({rec['exposed_comm_raw_s']:.3g} s/step) than communication in flight "
                 f"({rec['comm_raw_s']:.3g} s/step); comm_s and exposed_comm_s are left out (null, raw "
                 "values in *_raw_s) rather than printed contradicting each other")
        print(f"step {shown:>6}/{cfg.steps} | loss {rec['loss']:.4f} | {rec[unit + '_per_s']:>9,.0f} {unit}/s | "
              f"{comm_summary(rec)} | {sync_summary(rec)} | lr {rec['lr']:.4g}{extra}{servers}", flush=True)
        if run.log:
            run.log.write(json.dumps(rec) + "\n")
            run.log.flush()
    run.iv = Interval(run.ddp, done)


def _evaluate(run: Run, done: int) -> None:
    """Test metrics every --eval-every steps; every rank evaluates (same model, cheap): none waits
    for rank 0. The time is excluded from train_time_s and from the interval's rates. A mode whose
    workers run at their own pace (not collective_metrics) evaluates on rank 0 only: only its
    result is logged."""
    if not (run.sync.collective_metrics or run.rank0):
        return
    te, blocking = time.perf_counter(), stall.blocking_seconds
    res = run.work.evaluate(PipelineForward(run.pipe) if run.pipe else run.model)
    if run.log:
        run.log.write(json.dumps(dict(step=done, **res, train_time_s=te - run.t_start - run.eval_s)) + "\n")
        run.log.flush()
    run.eval_s += time.perf_counter() - te
    run.iv.exclude(time.perf_counter() - te, stall.blocking_seconds - blocking)


def _close(run: Run) -> None:
    if run.log:
        run.log.close()
        run.log = None


def _checkpoint_or_stop(run: Run, done: int):
    """Checkpoint every --checkpoint-every steps; stop after --stop-after-steps (exit 0 with a
    checkpoint, or 4 if it could not be written)."""
    cfg = run.cfg
    stopping = cfg.stop_after_steps and done - run.start >= cfg.stop_after_steps and done < cfg.steps
    if cfg.checkpoint_dir and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or stopping):
        err = save_checkpoint(run, done, run.iv.progress(run.skipped, run.consecutive))
        if checkpoint_failed(cfg, err, done, stopping):
            timeline.stop()
            _close(run)
            return 4
    if stopping:
        if cfg.checkpoint_dir and run.rank0:
            print(f"[disttrain] stopped after step {done}; continue with --resume", flush=True)
        timeline.stop()
        _close(run)
        return 0
    return None


def _finish(run: Run) -> int:
    """Timeline, final evaluation, final checkpoint, the closing line and metrics record."""
    cfg = run.cfg
    run.sync.finish(run)
    if timeline.stop() and run.rank0:
        print(f"[disttrain] timeline written to {cfg.timeline} (open in https://ui.perfetto.dev)", flush=True)
    res = run.work.evaluate(PipelineForward(run.pipe) if run.pipe else run.model, final=True)
    if cfg.checkpoint_dir:
        err = save_checkpoint(run, cfg.steps, run.iv.progress(run.skipped, run.consecutive))
        if checkpoint_failed(cfg, err, cfg.steps, False):
            _close(run)
            return 4
    if run.rank0:
        if "train_accuracy" in res:
            print(f"[disttrain] done: test accuracy {res['test_accuracy']:.4f} "
                  f"(train {res['train_accuracy']:.4f})", flush=True)
        else:
            print("[disttrain] done: " + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in res.items()), flush=True)
        if run.log:
            final = dict(step=cfg.steps, final=True, **res, **run.sync.summary())
            run.log.write(json.dumps(final) + "\n")
    _close(run)
    return 0
