"""Checkpoints of the main job: what is saved (parameters, optimizer state, compressor state,
the partial logging interval) through ``disttrain.checkpoint``, what must match to resume (the
model and the run, not the layout), and what to do when a write fails."""


import dataclasses
import json
import os
import sys

import disttrain as dt
from disttrain import checkpoint, stall
from disttrain.workloads import dp_invariant
from .config import ConfigError


# What the parameters are: a checkpoint that differs here cannot be loaded at all (--resume-force
# cannot help: the arrays would not fit or mean something else).
_ARCH_KEYS = ("model", "hidden", "dataset", "dtype", "optimizer", "vocab_size")
# What the run is: a different seed, batch, schedule, step count or data setting would silently
# continue a different run than the one checkpointed. Refused unless --resume-force.
_RUN_KEYS = ("seed", "global_batch_size", "steps", "lr", "warmup_steps", "momentum", "weight_decay", "batching",
             "max_tokens", "seq_len", "tables", "samples",
             # how replicas agree and how embeddings update change the math as much as lr does: a
             # checkpoint of --sync local:3 resumed under --sync sync (or lazy Adam under dense Adam)
             # continued another run without a word (attack5). The periodic modes' options are
             # config errors under a mode that ignores them, so comparing them is exact.
             "sync", "local_average_state", "outer_lr", "outer_momentum", "hybrid_period", "hybrid_exchange",
             "sparse_embeddings")
# (--dp/--pp/--tp and --sharding are the layout: a checkpoint reshards to any of them)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written and --on-checkpoint-error is stop."""


def _layout(cfg, mesh) -> dict:
    """What decides which rank holds which region: compressor state only survives an identical one."""
    lay = dict(dp=mesh.dp, pp=mesh.pp, tp=mesh.tp, shard=cfg.shard)
    if cfg.model == "dlrm":
        lay["sharding"] = cfg.sharding
    return lay


def save_checkpoint(run, step, progress=None) -> str | None:
    """Collective: every rank writes its shards of the parameters, optimizer state and compressor
    state (``disttrain.checkpoint``, any mode: data, tensor, pipeline, sharded embeddings, hybrid
    meshes); the manifest keeps the configuration, the data position (the step: every workload's
    batch is a function of the step) and the partial logging interval. `progress`: this rank's
    loss sum and count since the last logged step plus the skipped-step counters, so that a resume
    between two logging steps writes the same first record as the uninterrupted run.

    Returns None, or the error message of a failed write - the same on EVERY rank, so that all
    ranks warn, or all stop, together."""
    cfg, mesh = run.cfg, run.mesh
    progress = progress or {}
    try:
        checkpoint.save(cfg.checkpoint_dir, step, model=run.model, optimizer=run.opt, schedule=run.sched, ddp=run.ddp,
                        layout=_layout(cfg, mesh),
                        per_rank=dict(loss_sum=progress.get("loss_sum", 0.0), count=progress.get("count", 0.0)),
                        extra=dict(config=dataclasses.asdict(cfg), data_position=dict(step=step),
                                   data_digest=getattr(run.work, "data_digest", None),
                                   progress=dict(interval_start=progress.get("interval_start", step),
                                                 skipped=progress.get("skipped", 0),
                                                 consecutive_skipped=progress.get("consecutive", 0),
                                                 replication=mesh.pp * mesh.tp)))
    except checkpoint.CheckpointError as e:  # full disk, read-only directory, something in the way, ...
        return str(e)
    return None


def _check_restore(cfg, model_arrays, path, rec, warn, data_digest=None) -> None:
    """Raise ValueError (naming fields, parameters and shapes) for a checkpoint that does not fit
    this run; the run-defining differences only warn with --resume-force. `model_arrays`: {global
    name: shape} of the whole model as every rank now holds it; `data_digest`: the workload's
    (job/setup.py agreed it over the ranks), compared with the one the checkpoint was written with."""
    saved = rec.get("extra", {}).get("config")
    if not isinstance(saved, dict):
        raise ValueError(f"cannot resume from checkpoint {path}: it holds no configuration of the main job")
    diff = [k for k in _ARCH_KEYS if k in saved and saved[k] != getattr(cfg, k)]
    if diff:
        raise ValueError(f"checkpoint {path} was written for a different model: "
                         + ", ".join(f"{k}={saved.get(k)!r} (now {getattr(cfg, k)!r})" for k in diff))
    run_diff = [k for k in _RUN_KEYS if k in saved and saved[k] != getattr(cfg, k)
                and not (k == "momentum" and cfg.optimizer != "sgd")  # only SGD uses momentum
                and not (k == "sparse_embeddings" and cfg.model != "dlrm")]  # only dlrm has embedding tables
    what = ", ".join(f"{k.replace('_', '-')}={saved[k]!r} (now {getattr(cfg, k)!r})" for k in run_diff)
    saved_data = rec.get("extra", {}).get("data_digest")
    if saved_data and data_digest and saved_data != data_digest:  # e.g. restarted on hosts with another Python
        what += (", " if what else "") + ("the training data (another pydocs corpus: the hosts' Python differs "
                                          "from the one the checkpoint was written under)")
    saved_dp = (rec.get("layout") or {}).get("dp")
    dp = cfg.dp or max(1, dt.size() // (cfg.pp * cfg.tp))  # as setup() picks it
    if saved_dp and saved_dp != dp and not dp_invariant(cfg):  # e.g. an elastic restart on fewer ranks
        what += (", " if what else "") + (f"dp={saved_dp} (now {dp}), and this workload's batches depend on dp "
                                          f"(--batching {cfg.batching}{' with --max-tokens' if cfg.max_tokens else ''})")
    if what:
        if not cfg.resume_force:
            raise ValueError(f"checkpoint {path} belongs to a different run: {what}. Resuming would not continue "
                             "that run; use the same settings, or --resume-force to resume anyway")
        warn(f"[disttrain] warning: --resume-force: resuming {path} although the run differs: {what}")
    if rec["step"] > cfg.steps:
        raise ValueError(f"checkpoint {path} is at step {rec['step']}, past --steps {cfg.steps}")
    held = {k: tuple(v["shape"]) for k, v in rec["arrays"].items() if "/" not in k}  # parameters, not state
    if sorted(held) != sorted(model_arrays):
        raise ValueError(f"checkpoint {path} holds a different model: parameters {sorted(held)} but this model "
                         f"has {sorted(model_arrays)}")
    for name, shape in sorted(model_arrays.items()):
        if held[name] != shape:
            raise ValueError(f"checkpoint {path}: parameter {name!r} has shape {held[name]} in the checkpoint but "
                             f"{shape} in the model")
    bufs = rec.get("optimizer", {}).get("buffers", [])
    missing = [f"{n}/{b}" for n in sorted(model_arrays) for b in bufs if f"optimizer/{b}/{n}" not in rec["arrays"]]
    if missing:
        raise ValueError(f"checkpoint {path} lacks optimizer state {missing}: resuming would restart it from zero")


def restore(run) -> tuple[int, dict]:
    """Load the newest valid checkpoint into this run, whatever the number of ranks and layout it
    was written under (``disttrain.checkpoint`` reshards); return the step to resume at and this
    rank's saved progress (partial logging interval, skipped-step counters).

    Every rank reaches the same verdict: a damaged newest checkpoint is skipped with a warning (the
    previous one is used), one that does not fit raises ConfigError on every rank."""
    cfg, comm = run.cfg, dt.world().comm

    def warn(m):
        if dt.rank() == 0:
            print(m, file=sys.stderr, flush=True)

    # the whole model's global arrays, as all ranks hold them now (stages and shards differ per rank)
    mine = {s.name: tuple(s.shape) for s in run.ddp.parameter_shards()}
    model_arrays = {k: v for part in comm.allgather(mine) for k, v in part.items()}
    # tracked: ranks waiting here while others read (a slow or hung file system) show up in the
    # stall report and the flight record as waiting for the resume
    op = stall.enter("resume (checkpoint load)", None, group=dt.world())
    try:
        got = checkpoint.load(cfg.checkpoint_dir, model=run.model, optimizer=run.opt, schedule=run.sched,
                              ddp=run.ddp, layout=_layout(cfg, run.mesh), warn=warn,
                              check=lambda path, rec: _check_restore(cfg, model_arrays, path, rec, warn,
                                                                     getattr(run.work, "data_digest", None)))
    except checkpoint.CheckpointError as e:
        msg = str(e)
        raise ConfigError(msg if "checkpoint" in msg else f"cannot resume from {cfg.checkpoint_dir}: {msg}") from e
    finally:
        stall.leave(op)
    if dt.rank() == 0:
        print(f"[disttrain] resumed from {got.path} at step {got.step}", flush=True)
    return got.step, _saved_progress(got, _layout(cfg, run.mesh), run.mesh)


def _saved_progress(got, layout: dict, mesh) -> dict:
    """This rank's progress: under the same world size and layout each rank gets back its own
    partial loss sum and count (bit for bit, so the first record matches the uninterrupted run);
    otherwise rank 0 takes the interval's totals, rescaled from the saved run's replication
    (every tensor / pipeline rank of a replica counts its samples) to this one's."""
    p = got.extra.get("progress") or {}
    out = dict(interval_start=p.get("interval_start", got.step), skipped=p.get("skipped", 0),
               consecutive=p.get("consecutive_skipped", 0), loss_sum=0.0, count=0.0)
    parts = got.per_rank
    if len(parts) == dt.size() and got.record.get("layout") == dict(layout, world_size=dt.size(), dp=mesh.dp):
        out.update(loss_sum=parts[dt.rank()]["loss_sum"], count=parts[dt.rank()]["count"])
    elif dt.rank() == 0:
        scale = mesh.pp * mesh.tp / p.get("replication", 1)
        out.update(loss_sum=sum(x["loss_sum"] for x in parts) * scale, count=sum(x["count"] for x in parts) * scale)
    return out


def truncate_metrics(path: str, step: int, warn=None) -> None:
    """Drop records past the resumed step: the killed run logged them, the resumed run redoes them.
    A line that is not a JSON object - the torn last line of a run killed mid-write - is dropped
    with a warning instead of failing this and every later resume."""
    if not os.path.exists(path):
        return
    keep, torn = [], 0
    with open(path, errors="replace") as f:  # a torn write may end in bytes that are not UTF-8
        for ln in f:
            if not ln.strip():
                continue
            try:
                r = json.loads(ln)
            except ValueError:
                r = None
            if not isinstance(r, dict):
                torn += 1
                continue
            if r.get("step", 0) <= step and not r.get("final"):
                keep.append(ln if ln.endswith("\n") else ln + "\n")
    if torn and warn:
        warn(f"[disttrain] warning: {path}: dropped {torn} unreadable line(s) (a torn write of the interrupted run)")
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def checkpoint_failed(cfg, err, step, stopping) -> bool:
    """React to a failed checkpoint write (`err` is the same on every rank): every rank says so;
    True (stop, exit 4) with --on-checkpoint-error stop, or when the job is about to stop after
    --stop-after-steps and this checkpoint was its only way to continue; else warn and go on."""
    if not err:
        return False
    if cfg.on_checkpoint_error == "stop" or stopping:
        why = "--on-checkpoint-error stop" if cfg.on_checkpoint_error == "stop" else \
            "--stop-after-steps needs this checkpoint to continue"
        print(f"disttrain.train: rank {dt.rank()}: step {step}: {err}; stopping ({why})", file=sys.stderr, flush=True)
        return True
    print(f"[disttrain] rank {dt.rank()}: warning: step {step}: {err}; training continues without this checkpoint "
          "(--on-checkpoint-error warn)", file=sys.stderr, flush=True)
    return False


