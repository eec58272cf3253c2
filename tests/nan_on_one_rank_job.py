"""The main job with a NaN gradient on rank 1 only, at its 3rd step (after its own backward:
with --sync ssp:S / async DataParallel is a one-rank group, so this is what a bad sample on one
rank does); tests/test_sync_ps_job.py runs it.

    mpiexec -n 3 python tests/nan_on_one_rank_job.py --sync async --steps 8 --on-nonfinite stop
"""
import sys

import numpy as np

import disttrain as dt
import disttrain.job.loop as loop
from disttrain.train import main

orig, n = loop.train_step, [0]


def nan_step(ddp, *a, **k):
    loss = orig(ddp, *a, **k)
    n[0] += 1
    if dt.rank() == 1 and n[0] == 3:
        for p in ddp.parameters():
            p.grad[...] = np.nan
    return loss


loop.train_step = nan_step
sys.exit(main(sys.argv[1:]))
