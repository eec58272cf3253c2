"""DataParallel's buckets in the node's shared memory (parallel/shared_buckets.py) and the inline
last bucket (Engine.submit(inline=True)): one process on the global batch is the oracle."""
import gc
import os
import threading

import numpy as np
import pytest

import disttrain as dt
from disttrain import nn, optim
from disttrain.comm import lowlevel as L
from disttrain.parallel import shared_buckets as SB
from disttrain_zoo.mlp import MLP

from .test_data_parallel import STEPS, data, reference

LOCAL = 3
SIZES = [7, 13, 2]  # uneven sizes; a 2-element bias: fewer elements than ranks at p >= 3


@pytest.mark.mpi
@pytest.mark.parametrize("bucket_mb,overlap,validate,spare", [
    (1e-6, True, True, True), (1e-6, True, True, False), (1e-6, True, False, True), (1e-6, False, False, None),
    (25, True, True, None)])
def test_shared_buckets_match_one_process_bit_identical_on_every_rank(comm, bucket_mb, overlap, validate, spare,
                                                                      monkeypatch):
    """spare: a spare core per rank (buckets averaged on the communication thread during backward)
    or none (all after backward on the caller), forced; None = this machine's answer."""
    p, r = comm.Get_size(), comm.Get_rank()
    dt.set_validation(validate)
    if spare is not None:
        monkeypatch.setattr(SB, "spare_core", lambda: spare)
    want_params, want_grads = reference(p, SIZES, LOCAL)
    model, loss = MLP(SIZES, dtype=np.float64), nn.SoftmaxCrossEntropy()
    ddp = dt.DataParallel(model, bucket_mb=bucket_mb, overlap=overlap)
    assert (ddp._shared is not None) == (p > 1)  # one node, "auto", no compression, no shard
    if p > 1 and spare is not None:
        assert ddp._shared.overlap == spare
    if bucket_mb < 1e-3:
        assert len(ddp.buckets) == len(model.parameters())  # one per parameter: sizes 2, 26, 13, 91
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    x, y = data(p, SIZES, LOCAL)
    mine = slice(r * LOCAL, (r + 1) * LOCAL)
    for s in range(STEPS):
        loss.forward(ddp.forward(x[s][mine]), y[s][mine])
        ddp.backward(loss.backward())
        for q, g in zip(model.parameters(), want_grads[s]):
            np.testing.assert_allclose(q.grad, g, rtol=1e-10, atol=1e-13, err_msg=f"step {s} {q.name}")
        flat = np.concatenate([q.grad.ravel() for q in model.parameters()])
        assert all(np.array_equal(flat, o) for o in comm.allgather(flat))  # the same bits everywhere
        opt.step()
        opt.zero_grad()
    for q, w in zip(model.parameters(), want_params):
        np.testing.assert_allclose(q.data, w, rtol=1e-10, atol=1e-13, err_msg=q.name)


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_matches_the_numpy_reference_bit_for_bit(comm, dtype):
    rng = np.random.default_rng(comm.Get_rank())
    for p in (1, 2, 3, 5):
        for n, lo, hi in ((0, 0, 0), (1, 0, 1), (5000, 3, 4999), (4097, 0, 4097)):  # several blocks and tails
            rows = rng.standard_normal((p, n)).astype(dtype)
            want = rows.copy()
            SB.average_slice_ref(want, lo, hi, p)
            SB._average_slice(rows, lo, hi, dtype(p), np.empty(SB._BLOCK, dtype))
            assert np.array_equal(rows, want), (p, n, lo, hi)


@pytest.mark.mpi(min_size=2)
def test_a_window_is_reused_only_when_free_on_every_rank(comm):
    r = comm.Get_rank()
    g = dt.world()
    model = MLP(SIZES, dtype=np.float64)
    ddp = dt.DataParallel(model)
    first = ddp._shared.window
    kept = model.parameters()[0].grad if r == 0 else None  # rank 0 keeps a view of the first window
    del ddp, model
    gc.collect()
    second = dt.DataParallel(MLP(SIZES, dtype=np.float64))
    assert second._shared.window is not first  # rank 0's view keeps it busy: a new one on every rank
    del kept, second
    gc.collect()
    third = dt.DataParallel(MLP(SIZES, dtype=np.float64))
    pool = SB._windows[g.uid]
    assert third._shared.window in pool and len(pool) <= 2  # reused; a free one too small is released
    a, b = MLP(SIZES, dtype=np.float64, seed=1), MLP(SIZES, dtype=np.float64, seed=1)
    ddp_a, ddp_b = dt.DataParallel(a), dt.DataParallel(b)  # two live ones: two windows, no sharing
    assert ddp_a._shared.window is not ddp_b._shared.window
    x = np.full((2, SIZES[0]), float(r))
    loss = nn.SoftmaxCrossEntropy()
    for ddp, m in ((ddp_a, a), (ddp_b, b)):
        loss.forward(ddp.forward(x), np.zeros(2, int))
        ddp.backward(loss.backward())
    for qa, qb in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(qa.grad, qb.grad)


@pytest.mark.mpi(min_size=2)
def test_other_settings_keep_the_message_path(comm):
    m = lambda: MLP(SIZES, dtype=np.float64)  # noqa: E731
    assert dt.DataParallel(m(), algorithm="ring")._shared is None
    assert dt.DataParallel(m(), compression="fp16")._shared is None
    assert dt.DataParallel(m(), shard="optimizer")._shared is None
    assert dt.DataParallel(MLP(SIZES, dtype=np.float32))._shared is not None
    os.environ["DISTTRAIN_FAKE_NODES"] = "2"  # emulated hosts: no shared memory between them
    try:
        with dt.new_group(list(range(comm.Get_size()))) as g:
            assert dt.DataParallel(m(), group=g)._shared is None
    finally:
        del os.environ["DISTTRAIN_FAKE_NODES"]


@pytest.mark.mpi(min_size=2)
def test_different_dtypes_are_an_error_on_every_rank(comm):
    dtype = np.float32 if comm.Get_rank() == comm.Get_size() - 1 else np.float64
    with pytest.raises(dt.CollectiveError, match="dtype"):
        dt.DataParallel(MLP(SIZES, dtype=dtype))


class _RaiseOn(nn.Module):
    def __init__(self, rank):
        super().__init__()
        self.rank, self.armed = rank, False

    def forward(self, x):
        return x

    def backward(self, dy):
        if self.armed and dt.rank() == self.rank:
            raise ZeroDivisionError("boom")
        return dy


@pytest.mark.mpi(min_size=2)
def test_a_rank_raising_mid_backward_makes_every_rank_raise_then_training_goes_on(comm):
    p = comm.Get_size()
    rng = np.random.default_rng(0)
    bomb = _RaiseOn(p - 1)
    model = nn.Sequential(nn.Linear(5, 4, rng=rng, dtype=np.float64), nn.ReLU(), bomb,
                          nn.Linear(4, 3, rng=rng, dtype=np.float64))
    ddp, loss = dt.DataParallel(model, bucket_mb=1e-6), nn.SoftmaxCrossEntropy()
    assert ddp._shared is not None and len(ddp.buckets) == 4
    x, y = np.ones((2, 5)), np.zeros(2, int)
    bomb.armed = True
    loss.forward(ddp.forward(x), y)
    with pytest.raises((ZeroDivisionError, dt.CollectiveError)):  # the late buckets carry the error
        ddp.backward(loss.backward())
    bomb.armed = False
    for q in model.parameters():
        q.grad[...] = 0
    loss.forward(ddp.forward(x), y)  # the next step works: the rounds are still counted alike
    ddp.backward(loss.backward())
    ref = [q.grad.copy() for q in model.parameters()]
    assert all(all(np.array_equal(a, b) for a, b in zip(ref, o)) for o in comm.allgather(ref))


@pytest.mark.mpi
def test_inline_runs_here_when_idle_and_in_order_when_busy(comm):
    g = dt.world()
    where = []
    h = L.submit(lambda: where.append(threading.current_thread().name), "idle", None, g, inline=True)
    h.wait()
    assert where == [threading.current_thread().name]  # idle: on the caller's thread
    gate, order = threading.Event(), []
    first = L.submit(lambda: (gate.wait(10), order.append("first")), "busy", None, g)
    second = L.submit(lambda: order.append((threading.current_thread().name, "second")), "after", None, g,
                      inline=True)
    gate.set()
    first.wait(), second.wait()
    assert order == ["first", ("disttrain-comm", "second")]  # busy: queued behind the first
    x = np.full(5, comm.Get_rank() + 1.0)
    a = dt.allreduce_async(x)  # a real collective queued, then an inline one on the same lane
    b = L.submit(lambda: L.allreduce_on(g.async_comm, np.ones(3)), "inline allreduce", None, g, inline=True)
    p = comm.Get_size()
    np.testing.assert_array_equal(a.wait(), np.full(5, p * (p + 1) / 2))
    np.testing.assert_array_equal(b.wait(), np.full(3, float(p)))


def test_spare_core_means_two_cores_per_rank_on_the_host(monkeypatch):
    for cores, ranks, want in ((2, 2, False), (2, 1, True), (3, 2, False), (4, 2, True), (64, 8, True), (1, 1, False)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, c=cores: set(range(c)))
        monkeypatch.setattr(SB, "local_size", lambda n=ranks: n)
        assert SB.spare_core() is want, (cores, ranks)


@pytest.mark.mpi
def test_ranks_that_see_a_spare_core_differently_agree_on_when_to_average(comm, monkeypatch):
    """spare_core() reads this process's CPU affinity, which can differ between ranks (taskset,
    cgroups, an OpenMP runtime binding some ranks). A user layer's async collective in backward
    then reached the two ranks' communication threads before one's buckets and after the other's:
    each thread waited for the other (a hang). Forced: only rank 0 sees a spare core."""
    if comm.Get_size() == 1:
        pytest.skip("needs peers")
    monkeypatch.setattr(SB, "spare_core", lambda: comm.Get_rank() == 0)
    handles = []

    class ReLUWithItsOwnCollective(nn.ReLU):
        def backward(self, dy):
            handles.append(dt.allreduce_async(np.ones(1)))
            return super().backward(dy)

    model, loss = MLP(SIZES, dtype=np.float64), nn.SoftmaxCrossEntropy()
    model.layers[1] = ReLUWithItsOwnCollective()
    ddp = dt.DataParallel(model, bucket_mb=1e-6)
    assert ddp._shared.overlap is False  # the agreed answer: no rank has a spare core for sure
    x, y = data(comm.Get_size(), SIZES, LOCAL)
    loss.forward(ddp.forward(x[0][:LOCAL]), y[0][:LOCAL])
    ddp.backward(loss.backward())
    assert [float(h.wait()[0]) for h in handles] == [comm.Get_size()]


def test_a_round_is_done_only_when_every_rank_arrived(monkeypatch):
    """A waiting round looks for the first late rank, then re-reads its counter to sleep on it. If
    that rank arrived in between, the round is not done for that: a later rank may still be out
    (returning done there let a rank read peers' slices before they were written - 8 ranks'
    replicas diverged in the suite)."""
    line = SB._LINE // 8
    cnt = np.zeros(3 * line, np.int64)
    cnt[0], cnt[line] = 1, 1  # ranks 0 and 1 arrived at round 1, rank 2 not yet
    monkeypatch.setattr(SB, "_late", lambda c, p, k: 1)  # rank 1 was still late when _late looked
    assert SB._Round(cnt, 3, 1).Test() is False
    cnt[2 * line] = 1
    monkeypatch.undo()
    assert SB._Round(cnt, 3, 1).Test() is True
