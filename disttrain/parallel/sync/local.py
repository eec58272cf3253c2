"""``--sync local:H``: local SGD / periodic model averaging.

Every rank trains its own replica on its own share of each global batch for H optimizer steps -
DataParallel over a one-rank group, so no gradient is communicated - and then the replicas are
averaged over the data-parallel ranks (one fused allreduce; parallel/sync/exchange.py). Stich 2019
("Local SGD converges fast and communicates little") and FedAvg (McMahan et al. 2017): H times less
communication, and a straggler is waited for once per H steps instead of every step.

``local:1`` with SGD reproduces synchronous data parallelism on the global batch: each rank's
gradient is weighted by its share (workloads.train_step), the SGD update is linear in the
gradient (momentum and weight decay included), so the average of the H = 1 updates is the
update with the averaged gradient. (Adam's update is not linear: local:1 with Adam differs.)

``HybridGroups`` (hybrid.py) is the same machinery with groups of several ranks: this module
holds what both share (``PeriodicAveraging``).
"""
from __future__ import annotations

import numpy as np

from ... import numerics
from ...runtime import split
from .base import SYNC_MODES, SyncMode
from .exchange import EXCHANGES


def _positive_int(param: str, what: str) -> tuple:
    """(value, problems) of an integer parameter that must be >= 1."""
    try:
        v = int(param)
    except ValueError:
        return 0, [f"sync: {what} must be an integer >= 1 (got {param!r})"]
    return v, [] if v >= 1 else [f"sync: {what} must be an integer >= 1 (got {v})"]


class PeriodicAveraging(SyncMode):
    """Replicas in groups (synchronous inside: DataParallel over the group) that exchange every
    `period` steps (``EXCHANGES``). Subclasses say how the groups and the period are chosen
    (``groups(dp)``, ``period``).

    Each step: a rank whose (group-averaged) gradients are not finite skips its optimizer step
    (the others do not wait to vote: the verdict travels with the next exchange), so the loop
    hears of skipped steps at exchange steps only: update() returns False there if any rank
    skipped a step since the last exchange (one skip counted per period)."""

    period = 1

    @classmethod
    def problems(cls, param: str, cfg) -> list:
        name = cfg.sync
        out = []
        if cfg.pp > 1 or cfg.tp > 1:
            out.append(f"sync: --sync {name} averages whole replicas: use --pp 1 --tp 1 (pipeline and tensor "
                       "parallelism are not combined with it yet)")
        if cfg.shard != "none":
            out.append(f"sync: --sync {name} keeps a whole optimizer per replica: use --shard none")
        if cfg.model == "dlrm":
            out.append(f"sync: --sync {name} is not wired for sharded embeddings (model dlrm): use --sync sync")
        if cfg.hybrid_exchange not in EXCHANGES:
            out.append(f"sync: {EXCHANGES.problem(cfg.hybrid_exchange)}")
        if not 0 <= cfg.outer_momentum < 1 or cfg.outer_lr <= 0:
            out.append(f"outer-lr must be > 0 and outer-momentum in [0, 1) (got {cfg.outer_lr}, {cfg.outer_momentum})")
        if cfg.checkpoint_dir and not cfg.local_average_state and (cfg.optimizer != "sgd" or cfg.momentum):
            out.append(f"sync: with --sync {name} the replicas' optimizer states differ between exchanges and a "
                       "checkpoint keeps one of them (a resumed run would not continue this one): add "
                       "--local-average-state, or use sgd with --momentum 0, to use --checkpoint-dir")
        if cfg.checkpoint_dir and cfg.outer_momentum:
            out.append("--outer-momentum is not kept in checkpoints yet: use --outer-momentum 0 with --checkpoint-dir")
        return out

    @staticmethod
    def _landing(period: int, cfg, what: str) -> list:
        """Checkpoints must land where the replicas agree (right after an exchange)."""
        out = []
        for flag, v in (("checkpoint-every", cfg.checkpoint_every), ("stop-after-steps", cfg.stop_after_steps),
                        ("eval-every", cfg.eval_every)):
            if v and v % period:
                out.append(f"sync: --{flag} {v} is not a multiple of the exchange period {period} ({what}): "
                           "checkpoints and evaluations are taken where the replicas agree (right after an exchange)")
        return out

    def groups(self, dp: int) -> list:
        """The groups as lists of data-parallel ranks (consecutive, sizes differing by at most one)."""
        raise NotImplementedError

    def dp_group(self, mesh):
        gs = self.groups(mesh.dp)
        mine = next(i for i, g in enumerate(gs) if mesh.dp_rank in g)
        self.n_groups, self.exchange_group = len(gs), mesh.dp_group
        # one Split creates every group at once (color = group index), as parallel/mesh.py does
        return split(mesh.dp_group, mine, gs[mine].index(mesh.dp_rank), [mesh.dp_group.ranks[r] for r in gs[mine]])

    def start(self, run) -> None:
        self.exchange = EXCHANGES[run.cfg.hybrid_exchange](self.exchange_group, run.cfg)
        self.skipped = self.steps = 0
        self.seconds0 = self.bytes0 = 0
        self.started = False

    def update(self, run, step: int) -> bool:
        if not self.started:  # the outer optimizer's anchor: the model before this run's first local step
            self.exchange.start(run.model)
            self.started = True
        self.steps += 1
        # the gradients were averaged inside the group: the verdict is the same on its ranks
        finite = numerics.all_finite(run.ddp.parameters())
        if finite:
            run.opt.step()
            run.ddp.compressor.commit()
        else:
            self.skipped += 1
            run.ddp.compressor.rollback()
        run.opt.zero_grad()
        if self.n_groups == 1:  # one group (synchronous SGD): its ranks agree on the verdict now
            return finite
        if (step + 1) % self.period:
            return True
        return self._exchange(run)

    def _exchange(self, run) -> bool:
        finite = self.exchange(run.model, run.opt, self.skipped)
        self.skipped = 0
        return finite

    def finish(self, run) -> None:
        """The replicas agree on the model to evaluate and checkpoint: exchange once more unless
        the last step was an exchange (steps a multiple of the period)."""
        if self.n_groups > 1 and run.cfg.steps % self.period:
            self._exchange(run)

    def record(self) -> dict:
        ex, n = self.exchange, max(1, self.steps)
        out = dict(wait_s=(ex.seconds - self.seconds0) / n, bytes_sent_per_step=(ex.sent_bytes - self.bytes0) / n,
                   sync_groups=self.n_groups, sync_period=self.period)
        self.seconds0, self.bytes0, self.steps = ex.seconds, ex.sent_bytes, 0
        return out


@SYNC_MODES.register("local", takes_param=True)
class LocalSGD(PeriodicAveraging):
    """``local:H``: every data-parallel rank is its own group; average every H steps."""

    def __init__(self, param: str, cfg):
        super().__init__(param, cfg)
        self.period = int(param)

    @classmethod
    def problems(cls, param: str, cfg) -> list:
        h, out = _positive_int(param, "local:H needs H, the local steps between averages,")
        out += super().problems(param, cfg) + cls._no_compression(cfg)
        return out + (cls._landing(h, cfg, f"H of --sync {cfg.sync}") if h >= 1 else [])

    def groups(self, dp: int) -> list:
        return [[r] for r in range(dp)]

    @classmethod
    def _no_compression(cls, cfg) -> list:
        return [] if cfg.compression == "none" else [
            f"sync: --sync {cfg.sync} sends no gradients (each rank is its own group), so --compression "
            f"{cfg.compression} would only distort the local steps: use --compression none (or hybrid:G)"]


#: the options of the periodic modes, their defaults and the modes that read them
_OPTIONS = (("local_average_state", False, ("local", "hybrid")), ("outer_lr", 1.0, ("local", "hybrid")),
            ("outer_momentum", 0.0, ("local", "hybrid")), ("hybrid_exchange", "average", ("local", "hybrid")),
            ("hybrid_period", 4, ("hybrid",)))


def option_problems(cfg) -> list:
    """An option of these modes given to a mode that ignores it is a mistake worth naming."""
    base = cfg.sync.partition(":")[0]
    return [f"sync: --{k.replace('_', '-')} applies to --sync {' and '.join(f'{m}:...' for m in modes)}, not "
            f"--sync {cfg.sync}" for k, default, modes in _OPTIONS
            if base not in modes and getattr(cfg, k) != default]


def consecutive_groups(dp: int, g: int) -> list:
    """`g` groups of consecutive ranks 0..dp-1, the first dp % g of them one larger."""
    return [list(map(int, a)) for a in np.array_split(np.arange(dp), g)]
