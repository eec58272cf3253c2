"""What a checkpoint holds of a training run, as Shards of named global arrays plus JSON records.

- Model: ``ddp.parameter_shards()`` when a DataParallel is given (what this rank holds
  authoritatively, in every shard mode), else every parameter's shards (``nn.layout.shards``).
- Optimizer: every buffer of every parameter, ``optimizer/<buffer>/<global name>``, through the
  parameter's own layout - so momenta and Adam/LAMB moments reshard exactly like the parameters
  (a ZeRO optimizer's parameters are flat ranges of one global parameter; the same code serves).
  The step count, learning rate and optimizer class go to the manifest.
- LR schedule: ``state_dict()`` (its position) in the manifest.
- Compressor: each rank's error-feedback residuals / warm starts, ``compressor/<rank>/<key>``.
  They are per rank and per bucket - a residual is the part of *this rank's* gradient that was
  not sent yet, keyed by bucket - so no resharding means anything for them: they are restored only
  when the world size, the layout and the compressor are identical, and otherwise dropped with a
  warning (the run continues correctly; it only forgets the unsent gradient mass of one step).
"""
from __future__ import annotations

import numpy as np

from ..nn import layout

OPT, COMP = "optimizer/", "compressor/"


def model_shards(model=None, ddp=None) -> list:
    """The model's shards: a Module, or a list of Parameters; with a DataParallel, its own."""
    if ddp is not None:
        return ddp.parameter_shards()
    if model is None:
        raise ValueError("a checkpoint needs model= or ddp=")
    params = model.parameters() if hasattr(model, "parameters") else list(model)
    for p in params:
        if p.data.size and not p.data.flags.writeable:
            # DataParallel(shard="full") leaves read-only NaN stand-ins in the model: saving them
            # would write NaN as the weights, and a load could not fill them - its shards are ddp's
            raise ValueError(f"parameter {p.name!r} is read-only (a stand-in freed by DataParallel(shard='full')?): "
                             "pass ddp= so that the shards each rank owns are saved and loaded")
    return [s for p in params for s in layout.shards(p)]


def optimizer_buffers(opt) -> list:
    """This rank's buffer names (momentum, m, v, ...)."""
    return sorted({b for st in opt.state.values() for b in st})


def optimizer_shards(opt, buffers=None) -> tuple[list, list]:
    """(shards of every buffer of every parameter, buffers to install after a successful load).
    `buffers` (loading): the names the checkpoint holds; a missing one gets a new zero array that
    is only put into ``opt.state`` by :func:`install` - a failed load leaves the optimizer as it was."""
    out, new = [], []
    for p in opt.params:
        st = opt.state.get(p.name, {})
        for b in (sorted(st) if buffers is None else buffers):
            a = st.get(b)
            if a is not None and a.shape != p.data.shape:
                # e.g. RowWiseAdagrad's one value per row: no layout says where it sits globally
                raise ValueError(f"optimizer state {b!r} of {p.name!r} has shape {a.shape}, not the parameter's "
                                 f"{p.data.shape}: only parameter-shaped optimizer buffers can be checkpointed")
            if a is None:
                a = np.zeros_like(p.data)
                new.append((p.name, b, a))
            out += layout.shards(p, a, prefix=f"{OPT}{b}/")
    return out, new


def optimizer_record(opt, buffers: list) -> dict:
    return {"type": type(opt).__name__, "steps": int(opt.steps), "lr": float(opt.lr), "buffers": buffers}


def install(opt, rec: dict, new: list) -> None:
    """After a successful load: the new buffers, no buffer the checkpoint lacks, steps and lr."""
    for name, b, a in new:
        opt.state.setdefault(name, {})[b] = a
    for st in opt.state.values():
        for b in [b for b in st if b not in rec["buffers"]]:
            del st[b]  # the checkpointed optimizer had not created it yet: it starts from zero again
    opt.steps, opt.lr = int(rec["steps"]), float(rec["lr"])


def compressor_shards(arrays: dict, rank: int) -> list:
    """Whole-array shards of this rank's compressor state `arrays` ({key: array})."""
    return [layout.Shard(f"{COMP}{rank:05d}/{k}", tuple(a.shape), layout.whole(a.shape), None, a)
            for k, a in sorted(arrays.items())]


def compressor_arrays(record: dict, rank: int) -> dict:
    """Scratch arrays for this rank's saved compressor state (filled by the load)."""
    pre = f"{COMP}{rank:05d}/"
    return {k[len(pre):]: np.empty(v["shape"], v["dtype"]) for k, v in record["arrays"].items()
            if k.startswith(pre)}


def compressor_record(compressor, world_size: int, lay: dict) -> dict:
    return {"spec": compressor.spec, "world_size": world_size, "layout": lay}
