"""Set-up of the main job: the rank mesh, the workload, this rank's model or pipeline stage, the
optimizer and schedule, and evaluation through a pipeline."""




import disttrain as dt
from disttrain import optim
from disttrain import nn
from disttrain.parallel.pipeline import activations, assign, measure_layer_costs
from disttrain.workloads import WORKLOADS
from .config import TrainConfig


def build(cfg: TrainConfig, ddp):
    """The optimizer (over what this rank owns: ``ddp.make_optimizer``) and learning-rate schedule."""
    options = dict(weight_decay=cfg.weight_decay, **({"momentum": cfg.momentum} if cfg.optimizer == "sgd" else {}))
    opt = ddp.make_optimizer(optim.OPTIMIZERS[cfg.optimizer], lr=cfg.lr, **options)
    return opt, optim.WarmupCosine(opt, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps)


def setup(cfg: TrainConfig):
    """(mesh, workload, this rank's model or pipeline stage). Collective over the world; raises
    ValueError / CollectiveError with the same message on every rank for a configuration that does
    not fit the job (world not dp x pp x tp, sizes not divisible by tp, fewer layers than stages,
    micro-batches not dividing the batch)."""
    world = dt.size()
    dp = cfg.dp or max(1, world // (cfg.pp * cfg.tp))
    mesh = dt.Mesh(dp, cfg.pp, cfg.tp)
    fixed = WORKLOADS[cfg.model].unit == "samples"  # gnmt's batches vary: checked per step by the pipeline
    if cfg.pp > 1 and fixed and (cfg.global_batch_size % dp or (cfg.global_batch_size // dp) % cfg.micro_batches):
        raise ValueError(f"global batch {cfg.global_batch_size} over dp={dp} replicas must give each replica a "
                         f"batch divisible by {cfg.micro_batches} micro-batches")
    try:  # reads each host's own data: it may fail on some ranks only (agreed below)
        work, err = WORKLOADS[cfg.model](cfg, mesh.dp_rank, mesh.dp, mesh), None
    except ValueError as e:
        work, err = None, str(e)
    _agree_on_data(work, err)
    model = work.model
    model.parameters()  # names are global paths ("layers.4.weight") before the model is cut into stages
    if cfg.pp > 1:
        units = model.blocks()
        x = work.batch(0).inputs
        sample = activations.head(x, max(1, activations.rows(x) // cfg.micro_batches))
        # every rank measures (tensor-parallel layers communicate), rank 0's numbers decide: stage
        # boundaries must be identical everywhere
        costs = dt.world().comm.bcast(measure_layer_costs(units, sample), root=0)
        chunks = [nn.Sequential(*units[a:b]) for a, b in assign(costs, cfg.pp, cfg.virtual_stages)[mesh.pp_rank]]
        # interleaved: this rank's V chunks (global chunks s, s + p, ...) in one Sequential
        model = chunks[0] if cfg.virtual_stages == 1 else nn.Sequential(*chunks)
    return mesh, work, model


def _agree_on_data(work, err: str | None = None) -> None:
    """A workload that reads its data on each host (``data_digest``: the pydocs corpus comes from
    the host's own standard library, so another Python version gives other sentences and another
    vocabulary) must hold the same data on every rank: otherwise the ranks train on different
    sentences under different token ids, and nothing else would notice. The same ValueError on
    every rank (one allgather of the digests and of `err`, this rank's error building the
    workload: a rank whose own data made the set-up fail - a sentence over --max-tokens in its
    corpus - returned exit status 2 alone while its peers waited here for it forever)."""
    every = dt.world().comm.allgather((err, getattr(work, "data_digest", None)))
    failed = [(r, e) for r, (e, _) in enumerate(every) if e]
    if failed:
        r, e = failed[0]
        if len(failed) == len(every) and all(m == e for _, m in failed):
            raise ValueError(e)  # the configuration's own error: the same everywhere
        raise ValueError(f"{e} (on rank(s) {[q for q, m in failed if m == e]} only: the ranks' data differ)")
    every = [d for _, d in every]
    odd = [r for r, d in enumerate(every) if d != every[0]]
    if odd:
        raise ValueError(f"rank(s) {odd} built other training data than rank 0 (the pydocs corpus is read from "
                         "each host's own Python standard library: run every rank with the same Python installation)")


class PipelineForward:
    """Evaluation through the pipeline: forward(x) returns the last stage's output everywhere."""

    def __init__(self, pipe):
        self.pipe = pipe

    def forward(self, x):
        return self.pipe.predict(x)

    def eval(self):
        return self.train(False)

    def train(self, mode: bool = True):
        # this rank's stage switches mode too: dropout off, a vocabulary-parallel output layer
        # gathering the whole vocabulary's logits for evaluation
        self.pipe.module.train(mode)
        return self

