"""Set-up of the main job: the rank mesh, the workload, this rank's model or pipeline stage, the
optimizer and schedule, and evaluation through a pipeline."""




import disttrain as dt
from disttrain import optim
from disttrain import nn
from disttrain.parallel.pipeline import activations, assign, measure_layer_costs
from disttrain.workloads import WORKLOADS, agree_on_data
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
    """Every rank built the workload, or the same ValueError on every rank (workloads.agree_on_data;
    the built-in workloads agree on their data once more inside, before their model is built)."""
    agree_on_data(getattr(work, "data_digest", None), err)


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

