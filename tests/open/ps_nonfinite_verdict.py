"""OPEN (attack2): --sync ssp:S / async return a per-rank verdict for a non-finite gradient.

job/loop.py's _count_nonfinite counts skipped steps and exits 3 (--on-nonfinite stop, or more
than --max-skipped-steps in a row) on the assumption that ``sync.update``'s verdict is the same
on every rank (base.SyncMode.update's contract). The parameter-server modes return the rank's own
``np.isfinite`` check: a NaN on one rank makes only that rank exit 3 while the others keep
training (they then fail on its departure) - and the skip counters differ per rank.

Not in the suite (tests/mpi is driven at every rank count); the job-level consequence:
    mpiexec -n 3 python tests/open/nan_on_one_rank_job.py --sync async --steps 8 --on-nonfinite stop
repro of the verdicts:
    mpiexec -n 3 python tests/mpi/run.py /tmp/attack2-logs -x --no-header -q tests/open/ps_nonfinite_verdict.py
"""
import dataclasses

import numpy as np
import pytest

import disttrain as dt
from disttrain import nn, optim
from disttrain.job.config import TrainConfig
from disttrain.parallel.sync import make
from disttrain_zoo.mlp import MLP
from types import SimpleNamespace


@pytest.mark.mpi
@pytest.mark.parametrize("sync", ["ssp:0", "ssp:1", "async"])
def test_nonfinite_verdict_is_agreed(comm, sync):
    p, r = comm.Get_size(), comm.Get_rank()
    cfg = dataclasses.replace(TrainConfig(), sync=sync, dtype="float64", steps=4)
    mesh = dt.Mesh(p)
    mode = make(sync, cfg)
    group = mode.dp_group(mesh)
    model, loss = MLP([4, 5, 3], dtype=np.float64), nn.SoftmaxCrossEntropy()
    dt.broadcast_parameters(model, root=0)
    ddp = dt.DataParallel(model, bucket_mb=0.001, group=group)
    opt = optim.SGD(model.parameters(), lr=0.1)
    run = SimpleNamespace(model=model, ddp=ddp, opt=opt, cfg=cfg, sched=optim.Schedule(opt), mesh=mesh)
    mode.start(run)
    rng = np.random.default_rng(r)
    verdicts = []
    for s in range(4):
        loss.forward(model.forward(rng.standard_normal((2, 4))), rng.integers(0, 3, 2))
        ddp.backward(loss.backward())
        if (r, s) == (p - 1, 1):
            model.parameters()[0].grad[0, 0] = np.nan
        verdicts.append(mode.update(run, s))
    mode.finish(run)
    group.free()
    mesh.free()
    every = comm.allgather(verdicts)
    assert every == [every[0]] * p, f"{sync}: verdicts differ between ranks: {every}"
