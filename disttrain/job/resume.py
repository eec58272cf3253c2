"""Checkpoints of the main job: what is saved (parameters, optimizer state, compressor state,
the partial logging interval), what must match to resume, and what to do when a write fails."""


import dataclasses
import json
import os
import sys

import numpy as np

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
             "max_tokens", "seq_len", "tables", "samples", "sharding")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written and --on-checkpoint-error is stop."""


def save_checkpoint(cfg, step, model, opt, ddp, progress=None) -> str | None:
    """Collective: rank 0 writes the checkpoint, with every rank's compressor state gathered into
    it (error-feedback residuals differ per rank and are training state: a resume without them
    would drop gradient mass). `progress` (each rank's partial logging interval: loss sum and count
    since the last logged step, plus the skipped-step counters) makes a resume between two logging
    steps write the same first record as the uninterrupted run.

    Returns None, or the error message of a failed write - on EVERY rank (rank 0 decides and
    broadcasts), so that all ranks warn, or all stop, together."""
    comm = dt.world().comm
    zstates = comm.gather(ddp.compressor.state_dict(), root=0)
    progress = progress or {}
    partial = comm.gather([progress.get("loss_sum", 0.0), progress.get("count", 0.0)], root=0)
    err = None
    if dt.rank() == 0:
        arrays = {f"param/{p.name}": p.data for p in model.parameters()}
        opt_arrays = opt.state_arrays()
        arrays.update({f"opt/{k}": v for k, v in opt_arrays.items()})
        for r, st in enumerate(zstates):
            arrays.update({f"zstate/{r}/{k}": v for k, v in st.items()})
        arrays["progress/interval"] = np.array(partial, np.float64)  # (world, 2): loss sum, count per rank
        path = checkpoint.path_for(cfg.checkpoint_dir, step)
        try:
            checkpoint.save(path, arrays,
                            dict(step=step, opt_steps=opt.steps, world_size=dt.size(),
                                 mesh=dict(dp=dt.size(), pp=1, tp=1), data_position=dict(step=step, epoch_size=None),
                                 rng=dict(seed=cfg.seed),
                                 params={p.name: list(p.data.shape) for p in model.parameters()},
                                 opt_state=sorted(opt_arrays),  # every buffer must come back on resume
                                 progress=dict(interval_start=progress.get("interval_start", step),
                                               skipped=progress.get("skipped", 0),
                                               consecutive_skipped=progress.get("consecutive", 0)),
                                 config=dataclasses.asdict(cfg)))
        except OSError as e:  # full disk, read-only directory, a directory in the way, ...
            err = f"checkpoint {path} could not be written: {type(e).__name__}: {e}"
    return comm.bcast(err, root=0)


def _check_restore(cfg, path, meta, arrays, params, warn) -> None:
    """Raise ValueError (naming fields, parameters, arrays and shapes) for a checkpoint that does
    not fit this run; the run-defining differences only warn with --resume-force."""
    saved = meta["config"]
    diff = [k for k in _ARCH_KEYS if k in saved and saved[k] != getattr(cfg, k)]
    if diff:
        raise ValueError(f"checkpoint {path} was written for a different model: "
                         + ", ".join(f"{k}={saved.get(k)!r} (now {getattr(cfg, k)!r})" for k in diff))
    run_diff = [k for k in _RUN_KEYS if k in saved and saved[k] != getattr(cfg, k)
                and not (k == "momentum" and cfg.optimizer != "sgd")]  # only SGD uses momentum
    what = ", ".join(f"{k.replace('_', '-')}={saved[k]!r} (now {getattr(cfg, k)!r})" for k in run_diff)
    saved_dp, dp = (meta.get("mesh") or {}).get("dp"), cfg.dp or dt.size()  # checkpointed runs are dp only
    if saved_dp and saved_dp != dp and not dp_invariant(cfg):  # e.g. an elastic restart on fewer ranks
        what += (", " if what else "") + (f"dp={saved_dp} (now {dp}), and this workload's batches depend on dp "
                                          f"(--batching {cfg.batching}{' with --max-tokens' if cfg.max_tokens else ''})")
    if what:
        if not cfg.resume_force:
            raise ValueError(f"checkpoint {path} belongs to a different run: {what}. Resuming would not continue "
                             "that run; use the same settings, or --resume-force to resume anyway")
        warn(f"[disttrain] warning: --resume-force: resuming {path} although the run differs: {what}")
    if meta["step"] > cfg.steps:
        raise ValueError(f"checkpoint {path} is at step {meta['step']}, past --steps {cfg.steps}")
    want = {k: list(p.data.shape) for k, p in params.items()}
    if meta.get("params", want) != want:
        raise ValueError(f"checkpoint {path} holds a different model: parameters "
                         f"{meta['params']} but this model has {want}")
    # The arrays themselves, not only the metadata: NumPy would broadcast a (1, 256) array into a
    # (64, 256) parameter without a word.
    for name, p in params.items():
        a = arrays.get(f"param/{name}")
        if a is None:
            raise ValueError(f"checkpoint {path} has no array for parameter {name!r}")
        if a.shape != p.data.shape:
            raise ValueError(f"checkpoint {path}: parameter {name!r} has shape {a.shape} in the checkpoint but "
                             f"{p.data.shape} in the model")
    opt_keys = {k[4:] for k in arrays if k.startswith("opt/")}
    missing = sorted(set(meta.get("opt_state", [])) - opt_keys)
    # a parameter without a buffer that the others have would restart from zero momentum silently
    bufs = {k.rsplit("/", 1)[1] for k in opt_keys}
    missing += sorted(f"{n}/{b}" for n in params for b in bufs if f"{n}/{b}" not in opt_keys
                      and f"{n}/{b}" not in missing)
    if missing:
        raise ValueError(f"checkpoint {path} lacks optimizer state {missing}: resuming would restart it from zero")
    for k in sorted(opt_keys):
        name = k.rsplit("/", 1)[0]
        if name not in params:
            raise ValueError(f"checkpoint {path} has optimizer state {k!r} for a parameter the model does not have")
        if arrays[f"opt/{k}"].shape != params[name].data.shape:
            raise ValueError(f"checkpoint {path}: optimizer state {k!r} has shape {arrays[f'opt/{k}'].shape} but "
                             f"parameter {name!r} has {params[name].data.shape}")


def restore(cfg, model, opt, sched, ddp) -> tuple[int, dict]:
    """Load the newest valid checkpoint on rank 0, check it fits, broadcast it; return the step to
    resume at and this rank's saved progress (partial logging interval, skipped-step counters).

    Rank 0 alone reads and decides; its verdict - including any unexpected error while reading -
    is broadcast, so every rank raises ConfigError together or resumes together, never waits."""
    comm = dt.world().comm
    err, step, zstates, progress = None, 0, None, {}
    if dt.rank() == 0:
        def warn(m):
            print(m, file=sys.stderr, flush=True)

        try:
            path, arrays, meta = checkpoint.latest_valid(cfg.checkpoint_dir, warn=warn)
            if path is None:
                raise ValueError(f"--resume: no valid checkpoint in {cfg.checkpoint_dir}")
            params = {p.name: p for p in model.parameters()}
            _check_restore(cfg, path, meta, arrays, params, warn)
            for name, p in params.items():
                p.data[...] = arrays[f"param/{name}"]
            for key, v in arrays.items():
                if key.startswith("opt/"):
                    pname, buf = key[4:].rsplit("/", 1)
                    opt.state.setdefault(pname, {})[buf] = v.copy()
            opt.steps, step = meta["opt_steps"], meta["step"]
            zstates = _compressor_states(arrays, meta["config"], meta, cfg)
            progress = _saved_progress(arrays, meta)
            print(f"[disttrain] resumed from {path} at step {step}", flush=True)
        except Exception as e:  # noqa: BLE001 - any failure must reach the other ranks, not strand them
            err = str(e) if isinstance(e, (ValueError, KeyError)) else f"{type(e).__name__}: {e}"
            err = err if "checkpoint" in err else f"cannot resume from {cfg.checkpoint_dir}: {err}"
    # tracked: ranks waiting here while rank 0 reads (a slow or hung file system) show up in the
    # stall report and the flight record as waiting for the resume decision
    op = stall.enter("resume decision (broadcast from rank 0)", None, group=dt.world())
    err, step = comm.bcast((err, step), root=0)
    stall.leave(op)
    if err:
        raise ConfigError(err)
    mine = comm.scatter(zstates, root=0) if comm.bcast(zstates is not None, root=0) else None
    if mine is not None:
        ddp.compressor.load_state_dict(mine)
    progress = comm.scatter(progress if dt.rank() == 0 else None, root=0)
    dt.broadcast_parameters(model)
    dt.broadcast_optimizer_state(opt)
    sched.t = step
    sched._apply()
    return step, progress


def _saved_progress(arrays, meta) -> list:
    """Per-rank progress from a checkpoint (rank 0): each rank gets back its own partial loss sum
    and count (bit for bit, so the first record matches the uninterrupted run); at another world
    size rank 0 takes the totals (the same loss up to summation order)."""
    p = meta.get("progress") or {}
    base = dict(interval_start=p.get("interval_start", meta["step"]), skipped=p.get("skipped", 0),
                consecutive=p.get("consecutive_skipped", 0), loss_sum=0.0, count=0.0)
    out = [dict(base) for _ in range(dt.size())]
    part = arrays.get("progress/interval")
    if part is None or part.ndim != 2 or part.shape[1] != 2:  # older checkpoint: the interval starts here
        for o in out:
            o["interval_start"] = meta["step"]
        return out
    if part.shape[0] == dt.size():
        for o, (s, c) in zip(out, part):
            o.update(loss_sum=float(s), count=float(c))
    else:
        out[0].update(loss_sum=float(part[:, 0].sum()), count=float(part[:, 1].sum()))
    return out


def _compressor_states(arrays, saved, meta, cfg):
    """Per-rank compressor states from a checkpoint (rank 0), or None with a warning when they do not fit."""
    per_rank = {}
    for key, v in arrays.items():
        if key.startswith("zstate/"):
            r, name = key[7:].split("/", 1)
            per_rank.setdefault(int(r), {})[name] = v
    if saved.get("compression", "none") != cfg.compression or meta["world_size"] != dt.size():
        if per_rank:
            print(f"[disttrain] warning: the checkpoint's compressor state ({saved.get('compression')!r} on "
                  f"{meta['world_size']} ranks) does not fit this run ({cfg.compression!r} on {dt.size()} ranks); "
                  "error-feedback residuals start from zero", file=sys.stderr, flush=True)
        return None
    return [per_rank.get(r, {}) for r in range(dt.size())]


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


