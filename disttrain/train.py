"""The main job: synchronous data-parallel training under mpiexec.

    mpiexec -n 2 python -m disttrain.train                        # MLP on the embedded digits data
    mpiexec -n 2 python -m disttrain.train --model gnmt [--batching load_balanced --max-tokens 1024]
    mpiexec -n 2 python -m disttrain.train --model dlrm [--sharding row]   # embeddings sharded over AllToAll
    mpiexec -n 8 python -m disttrain.train --dp 2 --pp 2 --tp 2 --schedule 1f1b --micro-batches 4
    mpiexec -n 4 python -m disttrain.train --steps 1000 --global-batch-size 128 --metrics m.jsonl \\
        --checkpoint-dir ckpt --checkpoint-every 100 [--resume] [--config train.toml]

What is trained - model, data, per-rank batches, loss, evaluation - is a workload
(disttrain/workloads.py): `mlp` (digits, fixed global batch), `gnmt` (GNMT-lite on the
standard-library documentation corpus, variable-length batches from data/bucketing.py; the metrics
then add tokens_per_s, padding, imbalance and the time ranks waited at the gradient synchronisation)
`dlrm` (DLRM on synthetic power-law clicks, embedding tables sharded over the ranks) or
`transformer` (a small GPT-style LM on the same documentation corpus, tensor-/pipeline-parallel).

The ranks form a dp x pp x tp mesh (parallel/mesh.py; `--dp` defaults to world / (pp x tp)). For
the MLP, `--tp` splits its Linear layers in Megatron column/row pairs (for the transformer: its
attention heads and MLP columns) and `--pp` cuts it into
stages balanced by measured layer cost, run with `--schedule` and `--micro-batches`; DataParallel
averages over the dp groups. Every mesh trains the same model as one process on the global batch.

Configuration is a TrainConfig: defaults (then the model's own, workloads.MODEL_DEFAULTS), then an optional --config file (TOML or JSON with the
same keys), then command-line flags. Rank 0 prints a progress line and writes one JSON object per
logged step to --metrics (step, loss, samples_per_s, comm_s, exposed_comm_s, lr, ...; comm times
are seconds per step over the logging interval: comm_s is how long the gradient allreduces ran,
exposed_comm_s the part backward had to wait for). Checkpoints are atomic (checkpoint.py); with
--resume the job continues from the newest one in --checkpoint-dir and reproduces the
uninterrupted run exactly: the sampler's indices depend only on the step, and the parameters,
optimizer state, step count, schedule and the partial logging interval are restored bit for bit. A
checkpoint that does not fit (array shapes, missing optimizer state) is refused; one of a different
run (seed, batch, schedule, steps) too, unless --resume-force.

Exit status: 0 done (or stopped by --stop-after-steps with its checkpoint written); 2 configuration
error, or a checkpoint that cannot be resumed (one message, from rank 0); 3 non-finite gradients
(--on-nonfinite stop, or more than --max-skipped-steps skipped in a row); 4 a checkpoint could not
be written (--on-checkpoint-error stop, or the checkpoint of --stop-after-steps). Every rank exits
with the same status.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field

import numpy as np

import disttrain as dt
from disttrain import checkpoint, compression, numerics, optim, stall, timeline
from disttrain import nn
from disttrain.comm.errors import CollectiveError
from disttrain.data import STRATEGIES
from disttrain.parallel.embedding import SHARDINGS, ShardedEmbeddings
from disttrain.parallel.pipeline import SCHEDULES, measure_layer_costs, partition
from disttrain.workloads import MODEL_DEFAULTS, WORKLOADS, _gnmt_sizes, train_step


def _opt(default, help: str, choices=None):
    """A TrainConfig field with its --help text (meaning; the default and choices are appended)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    """Every setting of the main job; each is a --flag (underscores become dashes) and a config-file key.
    Models override some defaults (workloads.MODEL_DEFAULTS); --help shows both."""
    model: str = _opt("mlp", "what is trained (workloads.WORKLOADS)", ["mlp", "gnmt", "dlrm", "transformer"])
    hidden: str = _opt("256,256", "model sizes: mlp hidden widths 'W1,W2,...'; gnmt 'EMB,HIDDEN,LAYERS'; "
                       "transformer 'DIM,HEADS,LAYERS'; dlrm 'EMB,MLP1,MLP2'")
    dataset: str = _opt("digits", "training data: digits (mlp), pydocs (gnmt, transformer), clicks (dlrm)",
                        ["digits", "pydocs", "clicks"])
    batching: str = _opt("load_balanced", "variable-length data (gnmt): how sentences become per-rank batches",
                         ["naive", "bucketed", "load_balanced"])
    max_tokens: int = _opt(0, "gnmt: padded tokens per rank per step (0: --global-batch-size sentences); >= 0")
    vocab_size: int = _opt(1000, "gnmt, transformer: vocabulary size (the rest is UNK); >= 2")
    seq_len: int = _opt(32, "transformer: tokens per training window; >= 1")
    steps: int = _opt(600, "optimizer steps of the whole run (also the cosine schedule's length); >= 1")
    global_batch_size: int = _opt(64, "samples per step over all data-parallel ranks; >= 1, divisible by dp")
    optimizer: str = _opt("sgd", "update rule", ["sgd", "adam", "adamw", "lamb"])
    lr: float = _opt(0.05, "peak learning rate (after warm-up, then cosine decay to 0); finite, > 0")
    momentum: float = _opt(0.9, "SGD momentum; 0 <= momentum < 1")
    weight_decay: float = _opt(1e-4, "L2 weight decay (decoupled for adamw); finite, >= 0")
    warmup_steps: int = _opt(30, "linear learning-rate warm-up steps; >= 0")
    seed: int = _opt(0, "seed of the initial parameters and of the data order; any integer")
    dtype: str = _opt("float32", "parameter and gradient dtype", ["float32", "float64"])
    algorithm: str = _opt("auto", "gradient allreduce algorithm (auto: the cost model picks)",
                          ["auto", "ring", "tree", "double_tree", "butterfly", "rabenseifner", "ps", "mpi"])
    compression: str = _opt("none", "gradient compressor: none | fp16 | bf16 | topk:RATIO | onebit | powersgd:RANK")
    bucket_mb: float = _opt(25.0, "gradient bucket size in MiB (allreduce granularity); finite, > 0")
    overlap: bool = _opt(True, "overlap gradient allreduces with backward (--no-overlap: after backward)")
    log_every: int = _opt(50, "log a progress line and a metrics record every N steps; >= 1")
    eval_every: int = _opt(0, "also log test metrics every N steps (time-to-accuracy; evaluation time excluded); "
                           "0: only at the end; >= 0")
    metrics: str = _opt("", "JSON-lines file, one object per logged step (rank 0 writes it; its directory must "
                        "exist); empty: none")
    checkpoint_dir: str = _opt("", "directory of atomic checkpoints (created if missing); empty: no checkpoints")
    checkpoint_every: int = _opt(0, "write a checkpoint every N steps (and at the end); 0: only at the end; >= 0")
    resume: bool = _opt(False, "continue from the newest valid checkpoint in --checkpoint-dir")
    resume_force: bool = _opt(False, "resume even if the checkpoint's run differs in seed, batch, schedule or "
                              "steps (warns and lists the differences); the model itself must still match")
    timeline: str = _opt("", "Chrome-trace/Perfetto JSON of every rank (disttrain/timeline.py); empty: none")
    on_nonfinite: str = _opt("skip", "NaN/Inf gradients: skip the step with a warning, or stop the job (exit 3)",
                             ["skip", "stop"])
    max_skipped_steps: int = _opt(10, "with --on-nonfinite skip: stop (exit 3) when more than K steps in a row "
                                  "were skipped - the run has diverged; >= 0")
    on_checkpoint_error: str = _opt("warn", "a checkpoint that cannot be written (full disk, read-only "
                                    "directory): warn on every rank and keep training, or stop (exit 4)",
                                    ["warn", "stop"])
    stop_after_steps: int = _opt(0, "exit (with a checkpoint) after this many steps of this run, for "
                                 "time-limited allocations; 0: never; >= 0")
    dp: int = _opt(0, "data-parallel replicas (0: world / (pp * tp)); the rank grid is parallel/mesh.py; >= 0")
    pp: int = _opt(1, "pipeline stages (mlp, transformer): layers partitioned by measured cost; >= 1")
    tp: int = _opt(1, "tensor-parallel ranks per layer (mlp: Linear pairs; transformer: heads and MLP columns); >= 1")
    schedule: str = _opt("1f1b", "pipeline schedule", list(SCHEDULES))
    micro_batches: int = _opt(4, "micro-batches per pipeline step; must divide the per-replica batch; >= 1")
    sharding: str = _opt("row", "dlrm: embedding tables sharded table- or row-wise over the ranks", list(SHARDINGS))
    tables: str = _opt("100000,20000,5000,1000,200,50", "dlrm: rows per embedding table, comma-separated")
    samples: int = _opt(200000, "dlrm: synthetic click samples (90% train, 10% test); >= 1")
    alltoall_algorithm: str = _opt("auto", "dlrm: the embedding AllToAll algorithm",
                                   ["auto", "pairwise", "bruck", "mpi"])


class ConfigError(ValueError):
    pass


_KINDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing usage and exiting in every rank, and
    prints --help once (on the launcher's rank 0) rather than once per rank."""

    def error(self, message):
        raise ConfigError(f"{message} (see --help)")

    def print_help(self, file=None):
        if _launcher_rank() == 0:
            super().print_help(file)


def _launcher_rank() -> int:
    """This process's rank as the launcher tells it (before MPI is initialised): --help must not need MPI."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _help(f) -> str:
    text, choices = f.metadata["help"], f.metadata.get("choices")
    if choices:
        text += f"; choices: {', '.join(map(str, choices))}"
    per_model = {m: d[f.name] for m, d in MODEL_DEFAULTS.items() if f.name in d}
    shown = "empty" if f.default == "" else f.default
    if f.type in ("bool", bool):
        shown = "on" if f.default else "off"
    text += f" (default: {shown}" + "".join(f"; {m}: {v}" for m, v in per_model.items()) + ")"
    return text.replace("%", "%%")  # argparse formats help strings with %


def make_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m disttrain.train", description=__doc__.split("\n\n")[0],
                 epilog="Configuration errors end every rank with exit status 2 and one message (from rank 0).")
    ap.add_argument("--config", help="TOML (.toml) or JSON file with TrainConfig keys (dashes or underscores); "
                    "command-line flags override it (default: none)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=_help(f))
        else:  # strings here; _typed() converts with one message format for flags and config files
            ap.add_argument(flag, default=None, metavar=f.name.upper(), help=_help(f))
    return ap


def _typed(name: str, v, kind: str, source: str):
    """`v` as the field's type, or ConfigError naming the field and what it accepts. From the
    command line `v` is a string to convert; from a config file it must already have the type (TOML
    `steps = "10"` or `1.5` is a mistake worth reporting, not guessing)."""
    flag = "--" + name.replace("_", "-") if source == "command line" else f"{name} in {source}"
    want = _KINDS.get(kind, kind)
    accepted = _accepted(name)
    if accepted:
        want += f" ({accepted})"
    if kind == "str":
        if isinstance(v, str):
            return v
    elif kind == "bool":
        if isinstance(v, bool):
            return v
    elif isinstance(v, str) and source == "command line":
        try:
            x = int(v) if kind == "int" else float(v)
        except ValueError:
            raise ConfigError(f"{flag} must be {want} (got {v!r})") from None
        return _typed(name, x, kind, source)
    elif kind == "int" and isinstance(v, int) and not isinstance(v, bool):
        return v
    elif kind == "float" and isinstance(v, (int, float)) and not isinstance(v, bool):
        if not math.isfinite(v):
            raise ConfigError(f"{flag} must be {want} (got {v})")
        return float(v)
    raise ConfigError(f"{flag} must be {want} (got {v!r} of type {type(v).__name__})")


def _accepted(name: str) -> str:
    """The accepted range of a numeric field, from the last clause of its help ("finite, > 0")."""
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    last = f.metadata["help"].rsplit("; ", 1)[-1]
    return last if any(c in last for c in "<>") else ""


def parse_config(argv=None) -> TrainConfig:
    """TrainConfig from defaults, the model's defaults, --config FILE and flags; ConfigError (one
    message naming every bad field and what it accepts) for anything invalid."""
    a = make_parser().parse_args(argv)
    kinds = {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in dataclasses.fields(TrainConfig)}
    values = {}
    if a.config:
        values.update(_read_config_file(a.config))
    unknown = set(values) - set(kinds)
    if unknown:
        raise ConfigError(f"unknown configuration keys {sorted(unknown)}; valid keys: {sorted(kinds)}")
    problems = []
    for k, v in list(values.items()):
        try:
            values[k] = _typed(k, v, kinds[k], f"config file {a.config}")
        except ConfigError as e:
            problems.append(str(e))
    for k, v in vars(a).items():
        if k != "config" and v is not None:
            try:
                values[k] = _typed(k, v, kinds[k], "command line")
            except ConfigError as e:
                problems.append(str(e))
    if problems:
        raise ConfigError("; ".join(problems))
    model = values.get("model", TrainConfig.model)
    if model not in WORKLOADS:
        raise ConfigError(f"model must be one of {list(WORKLOADS)}, got {model!r}")
    cfg = TrainConfig(**{**MODEL_DEFAULTS[model], **values})
    _validate(cfg)
    return cfg


def _read_config_file(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            if path.endswith(".toml"):
                import tomllib

                d = tomllib.load(f)
            else:
                d = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    if not isinstance(d, dict):
        raise ConfigError(f"config file {path} must hold one table/object of TrainConfig keys")
    return {k.replace("-", "_"): v for k, v in d.items()}


def _validate(c: TrainConfig) -> None:
    problems = []
    for name, lo, what in [("steps", 1, "positive"), ("global_batch_size", 1, "positive"), ("log_every", 1, "positive"),
                           ("warmup_steps", 0, ">= 0"), ("checkpoint_every", 0, ">= 0"), ("eval_every", 0, ">= 0"),
                           ("stop_after_steps", 0, ">= 0"), ("max_skipped_steps", 0, ">= 0"),
                           ("samples", 1, "positive"), ("vocab_size", 2, ">= 2")]:
        if getattr(c, name) < lo:
            problems.append(f"{name.replace('_', '-')} must be {what} (an integer >= {lo}; got {getattr(c, name)})")
    if c.lr <= 0:
        problems.append(f"lr must be positive (a finite number > 0; got {c.lr})")
    if not 0 <= c.momentum < 1:
        problems.append(f"momentum must be in [0, 1) (got {c.momentum})")
    if c.weight_decay < 0:
        problems.append(f"weight-decay must be >= 0 (got {c.weight_decay})")
    if c.bucket_mb <= 0:
        problems.append(f"bucket-mb must be positive (a size in MiB > 0, e.g. 25; got {c.bucket_mb})")
    for name in ("metrics", "timeline"):
        path = getattr(c, name)
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            problems.append(f"{name}: the directory of {path!r} does not exist (create it or choose another path)")
        elif path and os.path.isdir(path):
            problems.append(f"{name}: {path!r} is a directory; give a file name")
    if c.optimizer not in ("sgd", "adam", "adamw", "lamb"):
        problems.append(f"optimizer must be sgd, adam, adamw or lamb (got {c.optimizer!r})")
    if c.batching not in STRATEGIES:
        problems.append(f"batching must be one of {list(STRATEGIES)} (got {c.batching!r})")
    if c.max_tokens < 0 or (c.max_tokens and c.model != "gnmt"):
        problems.append(f"max-tokens must be >= 0 and applies to variable-length data (model gnmt); got "
                        f"{c.max_tokens} with model {c.model}")
    if c.dtype not in ("float32", "float64"):
        problems.append(f"dtype must be float32 or float64 (got {c.dtype!r})")
    if c.resume and not c.checkpoint_dir:
        problems.append("--resume needs --checkpoint-dir")
    try:
        _gnmt_sizes(c.hidden) if c.model == "gnmt" else [int(h) for h in c.hidden.split(",") if h]
    except ValueError as e:
        problems.append(str(e) if c.model == "gnmt" else f"hidden must be comma-separated ints (got {c.hidden!r})")
    try:
        problem = compression.make(c.compression).check_algorithm(c.algorithm)
        if problem:
            problems.append(problem)
    except ValueError as e:
        problems.append(str(e))
    if min(c.pp, c.tp) < 1 or c.dp < 0:
        problems.append(f"pp and tp must be >= 1 and dp >= 0 (got dp={c.dp} pp={c.pp} tp={c.tp})")
    if (c.pp > 1 or c.tp > 1) and c.model not in ("mlp", "transformer"):
        problems.append(f"pipeline and tensor parallelism (--pp, --tp) are wired into the main job for models mlp "
                        f"and transformer; model {c.model} trains data-parallel only")
    if c.seq_len < 1:
        problems.append(f"seq-len must be >= 1 (got {c.seq_len})")
    if (c.pp > 1 or c.tp > 1) and (c.checkpoint_dir or c.resume):
        problems.append("checkpoints of pipeline / tensor-parallel runs are not supported yet; drop --checkpoint-dir "
                        "or use --pp 1 --tp 1")
    if c.model == "dlrm" and (c.checkpoint_dir or c.resume):
        problems.append("checkpoints of sharded-embedding runs (model dlrm) are not supported yet")
    if c.sharding not in SHARDINGS:
        problems.append(f"sharding must be one of {list(SHARDINGS)} (got {c.sharding!r})")
    if c.schedule not in SCHEDULES:
        problems.append(f"schedule must be one of {list(SCHEDULES)} (got {c.schedule!r})")
    if c.micro_batches < 1:
        problems.append(f"micro-batches must be >= 1 (got {c.micro_batches})")
    if c.on_nonfinite not in ("skip", "stop"):
        problems.append(f"on-nonfinite must be 'skip' or 'stop' (got {c.on_nonfinite!r})")
    if c.on_checkpoint_error not in ("warn", "stop"):
        problems.append(f"on-checkpoint-error must be 'warn' or 'stop' (got {c.on_checkpoint_error!r})")
    if problems:
        raise ConfigError("; ".join(problems))


def build(cfg: TrainConfig, model):
    """The optimizer and learning-rate schedule for the model."""
    params = model.parameters()
    opt = {"sgd": lambda: optim.SGD(params, cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay),
           "adam": lambda: optim.Adam(params, cfg.lr, weight_decay=cfg.weight_decay),
           "adamw": lambda: optim.AdamW(params, cfg.lr, weight_decay=cfg.weight_decay),
           "lamb": lambda: optim.LAMB(params, cfg.lr, weight_decay=cfg.weight_decay)}[cfg.optimizer]()
    return opt, optim.WarmupCosine(opt, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps)


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
    if run_diff:
        what = ", ".join(f"{k.replace('_', '-')}={saved[k]!r} (now {getattr(cfg, k)!r})" for k in run_diff)
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


def _truncate_metrics(path: str, step: int, warn=None) -> None:
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


def comm_fields(comm_total: float, exposed_total: float, steps: int) -> dict:
    """The communication fields of one logged interval: comm_s and exposed_comm_s, seconds per step.

    Both come from DataParallel's counters and rely on their definition (parallel/data.py):
    ``comm_seconds`` is the union of the time gradient communication was in flight and
    ``exposed_comm_seconds`` the part of it during which the step waited - the same clock, so
    0 <= exposed <= comm per interval by construction. A DataParallel whose counters break that
    (e.g. comm timed on the communication thread, exposed on the caller: queueing and wake-up
    latency then count as exposed but not as comm) gets both fields null, the raw values under
    *_raw_s and ``comm_accounting: "inconsistent"`` - never a record or progress line that
    contradicts itself, and no clamp that would hide the inconsistency."""
    comm, exposed = comm_total / steps, exposed_total / steps
    if 0 <= exposed <= comm * (1 + 1e-9) + 1e-12:  # tolerance: summation rounding only
        return dict(comm_s=comm, exposed_comm_s=exposed)
    return dict(comm_s=None, exposed_comm_s=None, comm_raw_s=comm, exposed_comm_raw_s=exposed,
                comm_accounting="inconsistent")


def _comm_summary(rec: dict) -> str:
    """The progress line's communication part: shares of the step time, exposed never above comm."""
    if rec["comm_s"] is None:
        return "comm n/a (inconsistent counters)"
    t = rec["step_time_s"] or 1.0
    return f"comm {rec['comm_s'] / t:4.0%} of step, exposed {rec['exposed_comm_s'] / t:4.0%}"


class _Interval:
    """What happened on this rank since the last logged step; `record` turns it into one metrics
    object (collective: every rank contributes its losses, counts and times)."""

    def __init__(self, ddp, start_step: int, loss_sum: float = 0.0, count: float = 0.0):
        """`start_step`: the last logged step (the interval covers the steps after it); `loss_sum`
        and `count`: this rank's part of the interval done before a resume (from the checkpoint)."""
        self.ddp, self.t0, self.start_step = ddp, time.perf_counter(), start_step
        self.loss_sum, self.count, self.global_count = loss_sum, count, 0.0
        self.steps = 0  # steps timed by this process: time, bytes and rates are per step over these
        self.busy, self.wait = [], []  # per step: seconds computing, seconds waiting at gradient sync
        self.real = self.padded = 0
        self.imbalance = []
        self.c0, self.e0, self.w0 = ddp.comm_seconds, ddp.exposed_comm_seconds, dict(ddp.wire_stats)
        self.h0, self.b0 = ddp.handoff_seconds, stall.blocking_seconds

    def add(self, loss, batch, busy, wait):
        self.steps += 1
        self.loss_sum += loss * batch.count
        self.count += batch.count
        self.global_count += batch.global_count
        self.busy.append(busy)
        self.wait.append(wait)
        if batch.stats:
            self.real += batch.stats["real_tokens"]
            self.padded += batch.stats["padded_tokens"]
            self.imbalance.append(batch.stats["imbalance"])

    def progress(self, skipped: int, consecutive: int) -> dict:
        """What a checkpoint keeps of this interval (see save_checkpoint)."""
        return dict(interval_start=self.start_step, loss_sum=self.loss_sum, count=self.count, skipped=skipped,
                    consecutive=consecutive)

    def record(self, done, unit, opt, skipped) -> dict:
        """The metrics object of the interval ending at step `done`: the loss over all its steps
        (including those before a resume), times and rates per step over the steps this process ran."""
        ddp, comm, n = self.ddp, dt.world().comm, max(1, self.steps)
        dt_s = time.perf_counter() - self.t0
        tot = dt.allreduce(np.array([self.loss_sum, self.count]), algorithm="mpi")
        rec = dict(step=done, loss=float(tot[0] / max(tot[1], 1)), step_time_s=dt_s / n)
        rec[f"{unit}_per_s"] = self.global_count / dt_s  # loss terms (samples or real tokens) per second
        # Blocking communication on the training thread (tensor-parallel allreduces, pipeline
        # receives, embedding AllToAlls, the finite-gradient vote) is in flight and waited for
        # at once: it adds to both.
        blocking = stall.blocking_seconds - self.b0
        rec.update(comm_fields(ddp.comm_seconds - self.c0 + blocking, ddp.exposed_comm_seconds - self.e0 + blocking, n))
        rec["handoff_s"] = (ddp.handoff_seconds - self.h0) / n
        rec["blocking_comm_s"] = blocking / n
        rec.update(lr=opt.lr, skipped_steps=skipped)
        w = ddp.wire_stats  # this rank's gradient bytes; ranks send alike
        rec["sent_bytes"] = (w["sent_bytes"] - self.w0["sent_bytes"]) / n
        rec["compression_ratio"] = w["ratio"]
        # the step's own wait (the exposed counter is measured on the training thread's clock)
        rec["compute_s"] = rec["step_time_s"] - (ddp.exposed_comm_seconds - self.e0 + ddp.handoff_seconds - self.h0
                                                  + blocking) / n
        # Per rank: the seconds per step it waited at the gradient synchronisation, and the part
        # of that explained by load imbalance (the slowest rank's compute time minus its own).
        busy = np.array(comm.allgather(self.busy))
        rec["sync_wait_s"] = [float(np.mean(x)) for x in comm.allgather(self.wait)]
        rec["imbalance_wait_s"] = [float(x) for x in (busy.max(axis=0) - busy).mean(axis=1)]
        if self.padded:
            rec.update(padding=1.0 - self.real / self.padded, imbalance=float(np.mean(self.imbalance)),
                       imbalance_max=float(np.max(self.imbalance)))
        rec["peak_rss_mib"] = comm.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, root=0)
        return rec


def setup(cfg: TrainConfig):
    """(mesh, workload, this rank's model or pipeline stage). Collective over the world; raises
    ValueError / CollectiveError with the same message on every rank for a configuration that does
    not fit the job (world not dp x pp x tp, sizes not divisible by tp, fewer layers than stages,
    micro-batches not dividing the batch)."""
    world = dt.size()
    dp = cfg.dp or max(1, world // (cfg.pp * cfg.tp))
    mesh = dt.Mesh(dp, cfg.pp, cfg.tp)
    if cfg.pp > 1 and (cfg.global_batch_size % dp or (cfg.global_batch_size // dp) % cfg.micro_batches):
        raise ValueError(f"global batch {cfg.global_batch_size} over dp={dp} replicas must give each replica a "
                         f"batch divisible by {cfg.micro_batches} micro-batches")
    work = WORKLOADS[cfg.model](cfg, mesh.dp_rank, mesh.dp, mesh)
    model = work.model
    model.parameters()  # names are global paths ("layers.4.weight") before the model is cut into stages
    if cfg.pp > 1:
        units = model.blocks()
        sample = work.batch(0).inputs[:max(1, cfg.global_batch_size // dp // cfg.micro_batches)]
        # every rank measures (tensor-parallel layers communicate), rank 0's numbers decide: stage
        # boundaries must be identical everywhere
        costs = dt.world().comm.bcast(measure_layer_costs(units, sample), root=0)
        a, b = partition(costs, cfg.pp)[mesh.pp_rank]
        model = nn.Sequential(*units[a:b])
    return mesh, work, model


def _checkpoint_failed(cfg, err, step, stopping) -> bool:
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


class _PipelineForward:
    """Evaluation through the pipeline: forward(x) returns the last stage's output everywhere."""

    def __init__(self, pipe):
        self.pipe = pipe

    def forward(self, x):
        return self.pipe.predict(x)

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self


def main(argv=None) -> int:
    try:
        cfg, err = parse_config(argv), None
    except ConfigError as e:
        cfg, err = None, str(e)
    dt.init()
    rank, world = dt.rank(), dt.size()
    # Every rank parsed the same flags, but files (config, metrics directory) may look different
    # on another host: agree, so that all ranks stop together with one message (rank 0's, or the
    # lowest failing rank's) and nobody proceeds into a collective the others never join.
    errs = dt.world().comm.allgather(err)
    bad = [(r, e) for r, e in enumerate(errs) if e]
    if bad:
        if rank == 0:
            r, e = bad[0]
            print(f"disttrain.train: configuration error{f' (on rank {r})' if r else ''}: {e}", file=sys.stderr,
                  flush=True)
        return 2
    try:
        mesh, work, model = setup(cfg)
    except (ValueError, CollectiveError) as e:  # decided from the configuration and the world size:
        if rank == 0:  # the same verdict on every rank, so all stop
            print(f"disttrain.train: configuration error: {e}", file=sys.stderr)
        return 2
    loss_fn, unit = work.loss_fn, work.unit
    opt, sched = build(cfg, model)  # model: this rank's stage (all layers unless pipelined)
    dt.broadcast_parameters(model, group=mesh.dp_group)  # replicas of the same shard agree
    ddp = dt.DataParallel(model, bucket_mb=cfg.bucket_mb, compression=cfg.compression, algorithm=cfg.algorithm,
                          overlap=cfg.overlap, group=mesh.dp_group)
    pipe = None
    if mesh.pp > 1:
        pipe = dt.Pipeline(ddp, mesh.pp_group, loss_fn if mesh.pp_is_last_stage else None, cfg.schedule,
                           cfg.micro_batches)
    eval_model = _PipelineForward(pipe) if pipe else model
    emb = getattr(model, "embeddings", None)
    # stages, tensor shards and embedding shards hold different parameters on different ranks
    model_parallel = mesh.pp * mesh.tp > 1 or not all(p.replicated for p in model.parameters())
    start = 0
    if cfg.resume:
        try:
            start, resumed = restore(cfg, model, opt, sched, ddp)
        except ConfigError as e:
            if rank == 0:
                print(f"disttrain.train: {e}", file=sys.stderr)
            return 2
    if cfg.timeline:
        timeline.start(cfg.timeline)
    if start and cfg.metrics and rank == 0:
        _truncate_metrics(cfg.metrics, start, warn=lambda m: print(m, file=sys.stderr, flush=True))
    log = open(cfg.metrics, "a" if start else "w") if (cfg.metrics and rank == 0) else None
    if rank == 0:
        print(f"[disttrain] {world} ranks (dp {mesh.dp} x pp {mesh.pp} x tp {mesh.tp}"
              f"{f', {cfg.schedule} with {cfg.micro_batches} micro-batches' if pipe else ''}) | {work.description} | "
              f"{cfg.steps} steps | {cfg.optimizer} lr {cfg.lr} | compression {cfg.compression}", flush=True)
    # train_time_s = wall time since t_start minus evaluations; consecutive: skipped steps in a row
    skipped, consecutive, t_start, eval_s, warned_comm = 0, 0, time.perf_counter(), 0.0, False
    iv = _Interval(ddp, start)
    if start:  # continue the skip counters and the logging interval the checkpoint was taken in
        skipped, consecutive = resumed["skipped"], resumed["consecutive"]
        iv = _Interval(ddp, resumed["interval_start"], resumed["loss_sum"], resumed["count"])
    for step in range(start, cfg.steps):
        batch = work.batch(step)
        with timeline.span("step", "step", step=step + 1):
            t, e = time.perf_counter(), ddp.exposed_comm_seconds + ddp.handoff_seconds
            if pipe:
                loss = pipe.step(batch.inputs if mesh.pp_is_first_stage else None,
                                 batch.targets if mesh.pp_is_last_stage else None)
            else:
                loss = train_step(ddp, loss_fn, batch, mesh.dp)
            wait = ddp.exposed_comm_seconds + ddp.handoff_seconds - e
            iv.add(loss, batch, time.perf_counter() - t - wait, wait)
            # Averaged grads are identical on every replica, so this verdict is too (numerics.py).
            if model_parallel:  # different parameters per rank: they vote
                finite = numerics.all_finite(model.parameters())
                finite = bool(dt.allreduce(np.array([int(finite)]), op="min", algorithm="mpi")[0])
            else:
                finite = numerics.all_finite(ddp.parameters())
            if finite:
                opt.step()
                ddp.compressor.commit()
            else:  # a skipped step leaves no trace in error-feedback / warm-start state either
                ddp.compressor.rollback()
            opt.zero_grad()
        sched.step()
        done = step + 1
        consecutive = 0 if finite else consecutive + 1
        if not finite:
            skipped += 1
            if cfg.on_nonfinite == "stop":
                if rank == 0:
                    print(f"disttrain.train: step {done}: non-finite (NaN/Inf) gradients; stopping before they "
                          f"are applied (--on-nonfinite stop). Lower --lr or check the data.",
                          file=sys.stderr, flush=True)
                timeline.stop()
                return 3
            if consecutive > cfg.max_skipped_steps:  # the verdict is the same on every rank: all stop
                if rank == 0:
                    print(f"disttrain.train: step {done}: {consecutive} steps in a row had non-finite (NaN/Inf) "
                          f"gradients (more than --max-skipped-steps {cfg.max_skipped_steps}): the run has diverged; "
                          "stopping. Lower --lr, add --warmup-steps or check the data.", file=sys.stderr, flush=True)
                timeline.stop()
                return 3
            if rank == 0:
                print(f"[disttrain] warning: step {done}: non-finite (NaN/Inf) gradients; step skipped "
                      f"({skipped} so far, {consecutive} in a row)", file=sys.stderr, flush=True)
        if done % cfg.log_every == 0 or done == cfg.steps:
            rec = iv.record(done, unit, opt, skipped)
            if isinstance(emb, ShardedEmbeddings):  # this rank's AllToAll bytes per step (ids, rows, grads)
                st = emb.stats
                rec["embedding_alltoall_bytes"] = (st.id_bytes + st.fwd_bytes + st.bwd_bytes) / max(1, iv.steps)
                st.reset()
            if pipe:  # this step's idle share per rank (pipeline bubble + waiting), and live activations
                st = dt.world().comm.allgather(pipe.stats)
                rec["pipeline_idle"] = [round(1 - x["compute_s"] / x["wall_s"], 4) for x in st]
                rec["pipeline_peak_live"] = [x["peak_live"] for x in st]
            rec["train_time_s"] = time.perf_counter() - t_start - eval_s
            if rank == 0:
                extra = (f" | padding {rec['padding']:.0%} imbalance {rec['imbalance']:.2f} | sync wait "
                         f"{1e3 * max(rec['sync_wait_s']):.0f} ms" if "padding" in rec else "")
                if "comm_accounting" in rec and not warned_comm:
                    warned_comm = True
                    print(f"[disttrain] warning: DataParallel reported more exposed communication "
                          f"({rec['exposed_comm_raw_s']:.3g} s/step) than communication in flight "
                          f"({rec['comm_raw_s']:.3g} s/step); comm_s and exposed_comm_s are left out (null, raw "
                          "values in *_raw_s) rather than printed contradicting each other",
                          file=sys.stderr, flush=True)
                print(f"step {done:>6}/{cfg.steps} | loss {rec['loss']:.4f} | {rec[unit + '_per_s']:>9,.0f} {unit}/s | "
                      f"{_comm_summary(rec)} | lr {opt.lr:.4g}{extra}", flush=True)
                if log:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
            iv = _Interval(ddp, done)
        if cfg.eval_every and done % cfg.eval_every == 0:
            te = time.perf_counter()  # every rank evaluates (same model, cheap): none waits for rank 0
            res = work.evaluate(eval_model)
            if log:
                log.write(json.dumps(dict(step=done, **res, train_time_s=te - t_start - eval_s)) + "\n")
                log.flush()
            eval_s += time.perf_counter() - te
            iv.t0 += time.perf_counter() - te
        stopping = cfg.stop_after_steps and done - start >= cfg.stop_after_steps and done < cfg.steps
        if cfg.checkpoint_dir and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or stopping):
            err = save_checkpoint(cfg, done, model, opt, ddp, iv.progress(skipped, consecutive))
            if _checkpoint_failed(cfg, err, done, stopping):
                timeline.stop()
                if log:
                    log.close()
                return 4
        if stopping:
            if cfg.checkpoint_dir and rank == 0:
                print(f"[disttrain] stopped after step {done}; continue with --resume", flush=True)
            timeline.stop()
            if log:
                log.close()
            return 0
    if timeline.stop() and rank == 0:
        print(f"[disttrain] timeline written to {cfg.timeline} (open in https://ui.perfetto.dev)", flush=True)
    res = work.evaluate(eval_model, final=True)
    if cfg.checkpoint_dir:
        err = save_checkpoint(cfg, cfg.steps, model, opt, ddp, iv.progress(skipped, consecutive))
        if _checkpoint_failed(cfg, err, cfg.steps, False):
            if log:
                log.close()
            return 4
    if rank == 0:
        if "train_accuracy" in res:
            print(f"[disttrain] done: test accuracy {res['test_accuracy']:.4f} "
                  f"(train {res['train_accuracy']:.4f})", flush=True)
        else:
            print("[disttrain] done: " + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in res.items()), flush=True)
        if log:
            log.write(json.dumps(dict(step=cfg.steps, final=True, **res)) + "\n")
            log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
