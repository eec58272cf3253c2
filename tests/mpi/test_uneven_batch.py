"""A global batch the data-parallel ranks do not divide (elastic restarts on 3 or 5 ranks):
uneven shares weighted by train_step reproduce one process on the global batch."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import nn, optim
from disttrain.data import DistributedSampler
from disttrain.workloads import Batch, train_step
from disttrain_zoo.mlp import MLP

# 1, 2, 3, 5 only (tests/test_mpi_suites.py): 5 ranks already get fewer samples than ranks
# (B = 1, 3: empty shares) and non-divisible shares; 4 and 8 add no other partition.
MPI_RANKS = (1, 2, 3, 5)

STEPS, SIZES, N = 4, [6, 16, 3], 40


def data():
    rng = np.random.default_rng(7)
    return rng.standard_normal((N, SIZES[0])), rng.integers(0, SIZES[-1], N)


def reference(B):
    """ONE process on the global batch of every step: the parameters after STEPS steps."""
    x, y = data()
    model, loss = MLP(SIZES, dtype=np.float64), nn.SoftmaxCrossEntropy()
    opt = optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    sampler = DistributedSampler(N, B, 0, 1, seed=1, uneven=True)
    for s in range(STEPS):
        idx = sampler.indices(s)
        loss.forward(model.forward(x[idx]), y[idx])
        model.backward(loss.backward())
        opt.step()
        opt.zero_grad()
    return [q.data.copy() for q in model.parameters()]


@pytest.mark.mpi
@pytest.mark.parametrize("B", [1, 3, 7, 16])  # fewer samples than ranks (empty shares), non-divisible
def test_uneven_shares_match_one_process(comm, B):
    p, r = comm.Get_size(), comm.Get_rank()
    x, y = data()
    model, loss = MLP(SIZES, dtype=np.float64), nn.SoftmaxCrossEntropy()
    ddp = dt.DataParallel(model, bucket_mb=0.001)
    opt = optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    sampler = DistributedSampler(N, B, r, p, seed=1, uneven=True)
    for s in range(STEPS):
        idx = sampler.indices(s)
        train_step(ddp, loss, Batch(x[idx], y[idx], len(idx), B), p)
        opt.step()
        opt.zero_grad()
    for q, w in zip(model.parameters(), reference(B)):
        np.testing.assert_allclose(q.data, w, rtol=1e-12, atol=1e-14, err_msg=f"{q.name} at {p} ranks, batch {B}")
