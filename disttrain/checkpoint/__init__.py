"""Universal checkpoints: every rank writes its own shards in parallel, one manifest says which
region of which global array every file holds, and a load reshards to any number of ranks and
any dp x pp x tp / shard / embedding layout (the idea of PyTorch Distributed Checkpoint and
DeepSpeed's universal checkpoints).

    dt.save_checkpoint("ck", step, model=model, optimizer=opt, schedule=sched, ddp=ddp, extra={...})
    step, extra = dt.load_checkpoint("ck", model=model, optimizer=opt, schedule=sched, ddp=ddp)
    python -m disttrain.checkpoint inspect ck/step-00000100
    python -m disttrain.checkpoint convert ck/step-00000100 --to single out.npz

Modules: ``api`` (the two calls), ``writer`` and ``reader`` (the collective write and the
resharding read), ``regions`` (overlap of two regions), ``manifest`` (the format, finding
checkpoints), ``state`` (what a training run saves), ``files`` (atomicity and file-system rules),
``single`` (the consolidated one-file format), ``__main__`` (the command line).
"""
from .api import Loaded, load, load_checkpoint, save, save_checkpoint
from .manifest import CheckpointError, CorruptCheckpoint
from .reader import newest_valid, verify

__all__ = ["save_checkpoint", "load_checkpoint", "save", "load", "Loaded", "CheckpointError", "CorruptCheckpoint",
           "newest_valid", "verify"]
