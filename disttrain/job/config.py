"""Configuration of the main job: the TrainConfig dataclass (every setting, its --help text and
range), the command-line parser, the optional TOML/JSON config file, and validation that names
the field and the accepted values."""


import argparse
import dataclasses
import json
import math
import os
import tomllib
from dataclasses import dataclass, field


from disttrain import compression
from disttrain import optim
from disttrain.comm.registry import ALLREDUCE, ALLTOALL
from disttrain.data import STRATEGIES
from disttrain.parallel.embedding import SHARDINGS
from disttrain.parallel.sync import problems as sync_problems
from disttrain.parallel.zero import algorithm_problem
from .straggler import problems as straggler_problems
from disttrain.parallel.pipeline import RECOMPUTE, SCHEDULES
from disttrain.parallel.pipeline.schedules import problem as schedule_problem
from disttrain.workloads import MODEL_DEFAULTS, WORKLOADS, _gnmt_sizes


def _opt(default, help: str, choices=None):
    """A TrainConfig field with its --help text (meaning; the default and choices are appended)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    """Every setting of the main job; each is a --flag (underscores become dashes) and a config-file key.
    Models override some defaults (workloads.MODEL_DEFAULTS); --help shows both."""
    model: str = _opt("mlp", "what is trained (workloads.WORKLOADS)", list(WORKLOADS))
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
    global_batch_size: int = _opt(64, "samples per step over all data-parallel ranks, the same at any dp (ranks' shares differ by "
                                 "at most one when dp does not divide it; pipelines and gnmt's naive / bucketed batching "
                                 "need a multiple of dp); >= 1")
    optimizer: str = _opt("sgd", "update rule", list(optim.OPTIMIZERS))
    lr: float = _opt(0.05, "peak learning rate (after warm-up, then cosine decay to 0); finite, > 0")
    momentum: float = _opt(0.9, "SGD momentum; 0 <= momentum < 1")
    weight_decay: float = _opt(1e-4, "L2 weight decay (decoupled for adamw); finite, >= 0")
    warmup_steps: int = _opt(30, "linear learning-rate warm-up steps; >= 0")
    seed: int = _opt(0, "seed of the initial parameters and of the data order; any integer")
    dtype: str = _opt("float32", "parameter and gradient dtype", ["float32", "float64"])
    algorithm: str = _opt("auto", "gradient allreduce algorithm (auto: the cost model picks)",
                          ["auto", "ring", "tree", "double_tree", "butterfly", "rabenseifner", "ps", "mpi"])
    compression: str = _opt("none", "gradient compressor: none | fp16 | bf16 | topk:RATIO | onebit | powersgd:RANK")
    sync: str = _opt("sync", "how replicas agree on parameters (parallel/sync.SYNC_MODES, NAME[:PARAM]): "
                     "sync (gradients averaged every step) | local:H (local SGD: H local steps, then the models are "
                     "averaged) | hybrid:G (G synchronous groups of consecutive ranks, exchanging every "
                     "--hybrid-period steps) | ssp:S (parameter servers, at most S steps ahead of the slowest worker; "
                     "ssp:0 = sync) | async (parameter servers, no bound)")
    local_average_state: bool = _opt(False, "local/hybrid: average the optimizer state (momentum, Adam moments) with "
                                     "the parameters at every exchange")
    outer_lr: float = _opt(1.0, "local/hybrid: outer learning rate on the averaged delta (DiLoCo; 1 with momentum 0: "
                           "plain averaging); finite, > 0")
    outer_momentum: float = _opt(0.0, "local/hybrid: outer Nesterov momentum (DiLoCo uses 0.9 with --outer-lr 0.7); "
                                 "0 <= outer-momentum < 1")
    hybrid_period: int = _opt(4, "hybrid: steps between the exchanges of the groups; >= 1")
    hybrid_exchange: str = _opt("average", "local/hybrid: how groups exchange (parallel/sync/exchange.py EXCHANGES)")
    straggler: str = _opt("", "experiments: RANK:FACTOR slows that rank's compute FACTOR times (it sleeps FACTOR-1 "
                          "times its measured compute each step); empty: none")
    shard: str = _opt("none", "ZeRO sharding over the data-parallel ranks: none | optimizer (ZeRO-1) | gradients "
                      "(ZeRO-2) | full (ZeRO-3 / FSDP)", ["none", "optimizer", "gradients", "full"])
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
    pp: int = _opt(1, "pipeline stages (every model: its blocks() partitioned by measured cost); >= 1")
    tp: int = _opt(1, "tensor-parallel ranks per layer (mlp and dlrm's MLPs: Linear pairs; transformer: heads "
                   "and MLP columns; transformer and gnmt: the output layer split by vocabulary); >= 1")
    schedule: str = _opt("1f1b", "pipeline schedule", list(SCHEDULES))
    micro_batches: int = _opt(4, "micro-batches per pipeline step; must divide the per-replica batch; >= 1")
    virtual_stages: int = _opt(1, "model chunks per pipeline rank (--schedule interleaved: >= 2, assigned "
                               "round-robin; micro-batches a multiple of --pp); >= 1")
    recompute: str = _opt("none", "pipeline activations: keep them (none), keep only each chunk's input "
                          "(full) or each unit's input (selective) and recompute the forward before the backward",
                          list(RECOMPUTE))
    sharding: str = _opt("row", "dlrm: embedding tables sharded table- or row-wise over the ranks", list(SHARDINGS))
    tables: str = _opt("100000,20000,5000,1000,200,50", "dlrm: rows per embedding table, comma-separated")
    samples: int = _opt(200000, "dlrm: synthetic click samples (90% train, 10% test); >= 1")
    alltoall_algorithm: str = _opt("auto", "dlrm: the embedding AllToAll algorithm",
                                   ["auto", "pairwise", "bruck", "mpi"])
    sparse_embeddings: bool = _opt(True, "dlrm: row-sparse embedding gradients, the optimizer updates only the rows "
                                         "a step looked up (sgd: lazy momentum, adam/adamw: lazy Adam; lamb refuses) "
                                         "(--no-sparse-embeddings: dense gradients, every row swept every step)")


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
    if c.optimizer not in optim.OPTIMIZERS:
        problems.append(f"optimizer must be one of {list(optim.OPTIMIZERS)} (got {c.optimizer!r})")
    for flag, family, name in (("--algorithm", ALLREDUCE, c.algorithm), ("--alltoall-algorithm", ALLTOALL,
                                                                          c.alltoall_algorithm)):
        if why := family.problem(name):  # refused only inside the run before (a traceback, exit 1), or never (--sync ssp)
            problems.append(f"{flag}: {why}")
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

    if c.seq_len < 1:
        problems.append(f"seq-len must be >= 1 (got {c.seq_len})")
    if c.shard not in ("none", "optimizer", "gradients", "full"):
        problems.append(f"shard must be one of none, optimizer, gradients, full (got {c.shard!r})")
    elif c.shard != "none":
        if c.pp > 1:
            problems.append("--shard with pipeline parallelism (--pp > 1) is not supported yet; use --pp 1")
        if c.shard != "optimizer" and c.compression != "none":
            problems.append(f"--shard {c.shard} reduce-scatters the gradients and cannot compress them; use --shard "
                            "optimizer with --compression, or --compression none")
        elif why := algorithm_problem(c.shard, c.compression != "none", c.algorithm, ("--shard ", "--algorithm")):
            problems.append(why)
    if c.sharding not in SHARDINGS:
        problems.append(f"sharding must be one of {list(SHARDINGS)} (got {c.sharding!r})")
    if (c.model == "dlrm" and c.sparse_embeddings and c.optimizer in optim.OPTIMIZERS
            and not optim.OPTIMIZERS[c.optimizer].sparse):
        sparse = [n for n in optim.OPTIMIZERS if optim.OPTIMIZERS[n].sparse]
        problems.append(f"optimizer {c.optimizer} cannot apply row-sparse embedding gradients: use one of {sparse}, "
                        "or --no-sparse-embeddings")
    if c.schedule not in SCHEDULES:
        problems.append(f"schedule must be one of {list(SCHEDULES)} (got {c.schedule!r})")
    if c.micro_batches < 1:
        problems.append(f"micro-batches must be >= 1 (got {c.micro_batches})")
    elif c.schedule in SCHEDULES and min(c.pp, c.tp) >= 1:
        bad = schedule_problem(c.schedule, c.pp, c.micro_batches, c.virtual_stages)
        if bad and (c.pp > 1 or c.virtual_stages != 1):
            problems.append(bad)
    if c.pp == 1 and (c.virtual_stages != 1 or c.recompute != "none"):
        problems.append("--virtual-stages and --recompute shape a pipeline: use them with --pp > 1")
    if c.recompute not in RECOMPUTE:
        problems.append(f"recompute must be one of {list(RECOMPUTE)} (got {c.recompute!r})")
    if c.on_nonfinite not in ("skip", "stop"):
        problems.append(f"on-nonfinite must be 'skip' or 'stop' (got {c.on_nonfinite!r})")
    if c.on_checkpoint_error not in ("warn", "stop"):
        problems.append(f"on-checkpoint-error must be 'warn' or 'stop' (got {c.on_checkpoint_error!r})")
    problems += sync_problems(c.sync, c)
    problems += straggler_problems(c.straggler)
    if problems:
        raise ConfigError("; ".join(problems))

