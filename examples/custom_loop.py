"""A custom training loop the way a Horovod or PyTorch-DDP user writes it, on disttrain's API:
sampler with set_epoch-like semantics, LR warm-up + cosine schedule, evaluation, checkpoints of
model + optimizer + schedule + DataParallel in one call each (dt.save_checkpoint /
dt.load_checkpoint: every rank writes its shards, any rank count can load them), and a run that
resumes exactly.

    launchers/local.sh 2 examples/custom_loop.py [--epochs 3] [--ckpt DIR]
"""
import argparse
import os
import tempfile

import numpy as np

import disttrain as dt
from disttrain import nn, optim
from disttrain.data import DistributedSampler, load
from disttrain_zoo.mlp import MLP


def evaluate(model, x, y) -> float:
    model.eval()
    acc = float(np.mean(model.forward(x).argmax(axis=1) == y))
    model.train()
    return acc


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
    start = 0
    if resume:  # the newest valid checkpoint in the directory; extra is what we saved with it
        _, extra = dt.load_checkpoint(ckpt, model=model, optimizer=opt, schedule=sched, ddp=ddp)
        start = extra["epoch"] + 1
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
        dt.save_checkpoint(ckpt, opt.steps, model=model, optimizer=opt, schedule=sched, ddp=ddp,
                           extra={"epoch": epoch})
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
    ckpt = os.path.join(d, "example")  # a directory of checkpoints (step-NNNNNNNN/)
    full, acc = train(a.epochs, ckpt)
    train(a.epochs, ckpt + ".2", stop_after=0)            # interrupted after the first epoch ...
    resumed, _ = train(a.epochs, ckpt + ".2", resume=True)  # ... and resumed
    same = all(np.array_equal(x, y) for x, y in zip(full, resumed))
    if dt.rank() == 0:
        print(f"final test accuracy {acc:.4f}; resumed run identical to the uninterrupted one: {same}")
    assert acc > 0.9 and same


if __name__ == "__main__":
    main()
