"""DataParallel reproduces one process trained on the global batch (the contract of sync SGD)."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import nn, optim
from disttrain_zoo.mlp import MLP

LOCAL_BATCH, STEPS, SIZES = 6, 5, [10, 32, 24, 5]


def data(p, sizes=SIZES, local=LOCAL_BATCH):
    rng = np.random.default_rng(123)
    x = rng.standard_normal((STEPS, local * p, sizes[0]))
    y = rng.integers(0, sizes[-1], (STEPS, local * p))
    return x, y


def reference(p, sizes=SIZES, local=LOCAL_BATCH):
    """The same model, optimizer and data in ONE process on the global batch: params and grads per step."""
    model, loss = MLP(sizes, dtype=np.float64), nn.SoftmaxCrossEntropy()
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    x, y = data(p, sizes, local)
    grads = []
    for s in range(STEPS):
        loss.forward(model.forward(x[s]), y[s])
        model.backward(loss.backward())
        grads.append([q.grad.copy() for q in model.parameters()])
        opt.step()
        opt.zero_grad()
    return [q.data.copy() for q in model.parameters()], grads


@pytest.mark.mpi
@pytest.mark.parametrize("bucket_mb,overlap,algorithm", [
    (25, True, "auto"), (0.002, True, "ring"), (0.002, False, "rabenseifner"), (0.0005, True, "tree"),
    (0.004, True, "double_tree"), (1, False, "mpi"), (0.001, True, "ps")])
def test_matches_one_process_on_the_global_batch(comm, bucket_mb, overlap, algorithm):
    p, r = comm.Get_size(), comm.Get_rank()
    want_params, want_grads = reference(p)
    model, loss = MLP(SIZES, dtype=np.float64, seed=r), nn.SoftmaxCrossEntropy()  # different inits ...
    dt.broadcast_parameters(model, root=0)  # ... made equal to rank 0's (seed 0, as the reference)
    ddp = dt.DataParallel(model, bucket_mb=bucket_mb, algorithm=algorithm, overlap=overlap)
    assert len(ddp.buckets) >= (2 if bucket_mb < 0.01 else 1)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    x, y = data(p)
    mine = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
    for s in range(STEPS):
        loss.forward(ddp.forward(x[s][mine]), y[s][mine])
        ddp.backward(loss.backward())
        for q, g in zip(model.parameters(), want_grads[s]):  # right after backward: global-batch grads
            np.testing.assert_allclose(q.grad, g, rtol=1e-10, atol=1e-12, err_msg=f"step {s} {q.name}")
        opt.step()
        opt.zero_grad()
    for q, w in zip(model.parameters(), want_params):
        np.testing.assert_allclose(q.data, w, rtol=1e-10, atol=1e-12, err_msg=q.name)


@pytest.mark.mpi
def test_no_sync_accumulates_then_averages(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    x, y = data(p)
    ref, loss = MLP(SIZES, dtype=np.float64), nn.SoftmaxCrossEntropy()
    for s in (0, 1):  # two micro-batches accumulated in one process
        loss.forward(ref.forward(x[s]), y[s])
        ref.backward(loss.backward())
    model = MLP(SIZES, dtype=np.float64)
    ddp = dt.DataParallel(model, bucket_mb=0.002)
    mine = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
    with ddp.no_sync():
        loss.forward(ddp.forward(x[0][mine]), y[0][mine])
        ddp.backward(loss.backward())
    loss.forward(ddp.forward(x[1][mine]), y[1][mine])
    ddp.backward(loss.backward())
    for q, w in zip(model.parameters(), ref.parameters()):
        np.testing.assert_allclose(q.grad, w.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.mpi
def test_optimizer_state_broadcast_alone_or_bad_root_raises_everywhere(comm):
    """attack9 (04): one rank broadcasting the optimizer state while the others go on, or a root
    outside the group, is a CollectiveError on every rank (the lone caller hung in a raw bcast)."""
    p, r = comm.Get_size(), comm.Get_rank()
    opt = optim.SGD(MLP([3, 4, 2], dtype=np.float64, seed=0).parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(dt.CollectiveError, match="root must be a rank"):
        dt.broadcast_optimizer_state(opt, root=p)
    if p < 2:
        return
    with pytest.raises(dt.CollectiveError):
        if r == p - 1:
            dt.broadcast_optimizer_state(opt)
        else:
            dt.allreduce(np.ones(5))
    np.testing.assert_array_equal(dt.allreduce(np.ones(3)), np.full(3, float(p)))  # the world is usable after


@pytest.mark.mpi
def test_optimizer_state_broadcast(comm):
    r = comm.Get_rank()
    model = MLP([3, 4, 2], dtype=np.float64, seed=r)
    opt = optim.Adam(model.parameters(), lr=1e-3 * (r + 1))
    for q in model.parameters():
        q.grad[...] = r + 1
    opt.step()
    dt.broadcast_parameters(model)
    dt.broadcast_optimizer_state(opt)
    everyone = comm.allgather((opt.lr, opt.steps, sorted((k, v.tobytes()) for k, v in opt.state_arrays().items())))
    assert all(e == everyone[0] for e in everyone)
