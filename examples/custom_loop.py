"""A custom training loop the way a Horovod or PyTorch-DDP user writes it, on disttrain's API:
sampler with set_epoch-like semantics, LR warm-up + cosine schedule, evaluation, checkpoint save /
restore of model + optimizer + schedule through public APIs, and a run that resumes exactly.

    launchers/local.sh 2 examples/custom_loop.py [--epochs 3] [--ckpt DIR]
"""
import argparse
import os
import tempfile

import numpy as np

import disttrain as dt
from disttrain import checkpoint, nn, optim
from disttrain.data import DistributedSampler, load
from disttrain_zoo.mlp import MLP


def evaluate(model, x, y) -> float:
    model.eval()
    acc = float(np.mean(model.forward(x).argmax(axis=1) == y))
    model.train()
    return acc


def save(path, model, opt, sched, epoch):
    """Rank 0 writes model + optimizer state + schedule position (all ranks hold the same)."""
    if dt.rank() == 0:
        arrays = {f"param/{p.name}": p.data for p in model.parameters()}
        arrays.update({f"opt/{k}": v for k, v in opt.state_arrays().items()})
        checkpoint.save(path, arrays, {"epoch": epoch, "opt_steps": opt.steps, "sched": sched.state_dict()})
    dt.world().comm.Barrier()


def restore(path, model, opt, sched) -> int:
    """Rank 0 reads; parameters and optimizer state are broadcast; returns the epoch to start at."""
    meta = None
    if dt.rank() == 0:
        arrays, meta = checkpoint.load(path)
        for p in model.parameters():
            p.data[...] = arrays[f"param/{p.name}"]
        for key, v in arrays.items():
            if key.startswith("opt/"):
                name, buf = key[4:].rsplit("/", 1)
                opt.state.setdefault(name, {})[buf] = v.copy()
        opt.steps = meta["opt_steps"]
    meta = dt.world().comm.bcast(meta, root=0)
    dt.broadcast_parameters(model)
    dt.broadcast_optimizer_state(opt)
    sched.load_state_dict(meta["sched"])
    return meta["epoch"] + 1


def train(epochs, ckpt, resume=False, stop_after=None):
    data = load("digits")
    model = MLP([data.x_train.shape[1], 128, data.num_classes], seed=0)
    dt.broadcast_parameters(model)
    ddp = dt.DataParallel(model)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batch = 64  # global
    steps_per_epoch = len(data.y_train) // batch
    sched = optim.WarmupCosine(opt, total_steps=epochs * steps_per_epoch, warmup_steps=20)
    loss_fn = nn.SoftmaxCrossEntropy()
    sampler = DistributedSampler(len(data.y_train), batch, dt.rank(), dt.size(), seed=0)
    start = restore(ckpt, model, opt, sched) if resume else 0
    for epoch in range(start, epochs):
        for s in range(steps_per_epoch):
            idx = sampler.indices(epoch * steps_per_epoch + s)  # a function of the step: set_epoch built in
            loss = loss_fn.forward(ddp.forward(data.x_train[idx]), data.y_train[idx])
            ddp.backward(loss_fn.backward())
            opt.step()
            opt.zero_grad()
            sched.step()
        acc = evaluate(model, data.x_test, data.y_test)
        if dt.rank() == 0:
            print(f"epoch {epoch}: loss {loss:.4f} test accuracy {acc:.4f} lr {opt.lr:.4f}", flush=True)
        save(ckpt, model, opt, sched, epoch)
        if stop_after is not None and epoch == stop_after:
            break
    return [p.data.copy() for p in model.parameters()], acc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--ckpt", default="")
    a = ap.parse_args()
    dt.init()
    d = a.ckpt or dt.world().comm.bcast(tempfile.mkdtemp() if dt.rank() == 0 else None)
    ckpt = os.path.join(d, "example.npz")
    full, acc = train(a.epochs, ckpt)
    train(a.epochs, ckpt + ".2", stop_after=0)            # interrupted after the first epoch ...
    resumed, _ = train(a.epochs, ckpt + ".2", resume=True)  # ... and resumed
    same = all(np.array_equal(x, y) for x, y in zip(full, resumed))
    if dt.rank() == 0:
        print(f"final test accuracy {acc:.4f}; resumed run identical to the uninterrupted one: {same}")
    assert acc > 0.9 and same


if __name__ == "__main__":
    main()
