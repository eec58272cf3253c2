"""Compressed averaging across ranks against one-process oracles, and DataParallel with compression."""
import zlib

import numpy as np
import pytest

import disttrain as dt
from disttrain import compression as Z
from disttrain import nn, optim
from disttrain_zoo.mlp import MLP

from .conftest import rank_rng

#: The rank counts tests/test_mpi_suites.py runs this file at (the rule there: 1, 2, 3 and 5 always; 4 and
# 8 where they reach a case of their own). Here the compressors' own p-dependence is the number of
# contributions summed (and the fp16 scale against overflow of that sum: largest at 8) and the powers of
# two against the rest (2 and 8; 3 and 5 odd); 4 reaches nothing of its own.
MPI_RANKS = (1, 2, 3, 5, 8)

SIZES = [0, 1, 5, 1003]


def gathered(comm, x):
    """Every rank's x (the oracle's inputs), via MPI's own allgather."""
    return comm.allgather(x)


@pytest.mark.mpi
@pytest.mark.parametrize("spec", ["topk:0.1", "topk:1", "onebit"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_and_sign_match_the_simulated_ranks(comm, spec, dtype):
    """reduce_ (allgather of payloads) == the average of every rank's own compress/decompress,
    simulated in one process with one compressor state per rank, over several steps."""
    p = comm.Get_size()
    for n in SIZES:
        mine = Z.make(spec)
        sim = [Z.make(spec) for _ in range(p)]
        rng = rank_rng(comm, salt=n)
        for step in range(3):
            x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 1, n)).astype(dtype)
            xs = gathered(comm, x)
            want = np.zeros(n, np.float64)
            for i in range(p):
                payload, ctx = sim[i].compress(xs[i].copy(), key="b")
                want += sim[i].decompress(payload, ctx)
            want /= p
            got = mine.reduce_(Z.Bucket(x, "b"), comm)
            tol = 1e-5 if dtype == np.float32 else 1e-12
            assert np.allclose(got, want, rtol=tol, atol=tol * (np.abs(want).max() if n else 1)), (spec, n, step)
            assert np.array_equal(mine.state["b"]["residual"], sim[comm.Get_rank()].state["b"]["residual"])
            assert all(np.array_equal(g, got) for g in gathered(comm, got))  # identical bits on every rank
        if spec == "topk:1" and n:
            assert np.array_equal(mine.state["b"]["residual"], np.zeros(n, dtype))  # all sent: exact


@pytest.mark.mpi
def test_powersgd_matches_a_numpy_oracle(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    layout = [(0, (30, 12)), (360, (12,)), (372, (2, 3, 5))]
    n = 402
    c = Z.PowerSGD(2)
    q = np.random.default_rng([zlib.crc32(b"b"), 0]).standard_normal((12, 2))  # the documented warm start
    resid = np.zeros((p, n))
    rng = rank_rng(comm, salt=7)
    for step in range(4):
        x = rng.standard_normal(n)
        xs = np.array(gathered(comm, x))
        got = c.reduce_(Z.Bucket(x.copy(), "b", layout), comm)
        # oracle: the algorithm of Vogels et al. written out for all ranks at once
        acc = xs + resid
        want = np.empty(n)
        want[360:372] = acc[:, 360:372].mean(0)
        resid[:, 360:372] = 0
        Ms = acc[:, :360].reshape(p, 30, 12)
        P = sum(M @ q for M in Ms)
        Ph = np.linalg.qr(P)[0]
        q = np.mean([M.T @ Ph for M in Ms], axis=0)
        approx = Ph @ q.T
        want[:360] = approx.ravel()
        resid[:, :360] = (Ms - approx).reshape(p, -1)
        # (2, 3, 5) is 2 x 15: 2 * (2 + 15) >= 30 -> sent exactly
        want[372:] = acc[:, 372:].mean(0)
        resid[:, 372:] = 0
        assert np.allclose(got, want, rtol=1e-9, atol=1e-9), step
        assert np.allclose(c.state["b"]["residual"], resid[r], rtol=1e-9, atol=1e-9)


@pytest.mark.mpi
@pytest.mark.parametrize("spec,u", [("fp16", 2.0 ** -11), ("bf16", 2.0 ** -8)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sixteen_bit_wire_within_rounding_bounds(comm, spec, u, dtype):
    p = comm.Get_size()
    for n in SIZES + [70001]:
        rng = rank_rng(comm, salt=n)
        x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 3, n)).astype(dtype)
        exact = np.mean(gathered(comm, x.astype(np.float64)), axis=0)
        bound = np.sum(np.abs(gathered(comm, x.astype(np.float64))), axis=0) / p
        got = Z.make(spec).reduce_(Z.Bucket(x, "b"), comm)
        assert got.dtype == dtype
        # each element is rounded at most p times (each partial sum once, plus the final block);
        # fp16 elements far below the scaled maximum may sit in fp16's subnormal range: absolute term
        small = 2.0 ** -24 * np.abs(bound).max() * 2 ** 6 if spec == "fp16" and n else 0
        assert np.all(np.abs(got - exact) <= (p + 1) * u * bound * (1 + 1e-6) + small), (spec, n)
        assert all(np.array_equal(g, got) for g in gathered(comm, got))


@pytest.mark.mpi
def test_fp16_scale_prevents_overflow_of_the_sum(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    x = np.full(100, 60000.0, np.float32) * (1 + r % 2)  # any two of these overflow fp16 when summed
    want = np.mean([60000.0 * (1 + i % 2) for i in range(p)])
    got = Z.FP16().reduce_(Z.Bucket(x, "b"), comm)
    assert np.all(np.isfinite(got)) and np.allclose(got, want, rtol=p * 2.0 ** -10)


# ------------------------------------------------------------------- a skipped (non-finite) step
def bits(a):
    """a's bits, so that NaN compares equal to the same NaN."""
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


@pytest.mark.mpi
@pytest.mark.parametrize("spec", ["topk:0.1", "onebit", "powersgd:2", "fp16", "bf16"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_nan_step_rolled_back_leaves_no_trace(comm, spec, dtype):
    """Finite steps, then one with a NaN (and an inf) on the last rank only, then rollback, then
    finite steps: the bad step's average is non-finite on every rank with the same bits (so every
    rank votes to skip it), and afterwards outputs and state are bit-identical to a run that never
    saw it - the error-feedback residual / PowerSGD's Q must not carry the NaN on."""
    p, r = comm.Get_size(), comm.Get_rank()
    layout = [(0, (30, 12)), (360, (12,)), (372, (2, 3, 5))]
    rng = rank_rng(comm, salt=21)
    good = [(rng.standard_normal(402) * 10.0 ** rng.uniform(-3, 1, 402)).astype(dtype) for _ in range(6)]
    ref, c = Z.make(spec), Z.make(spec)
    for i, g in enumerate(good):
        want = ref.reduce_(Z.Bucket(g.copy(), "b", layout), comm)
        if i == 3:
            bad = g.copy()
            if r == p - 1:
                bad[[5, 365]] = np.nan, np.inf
            out = c.reduce_(Z.Bucket(bad, "b", layout), comm)
            skip = not np.all(np.isfinite(out))
            assert all(gathered(comm, skip)), "the bad step must be non-finite on every rank"
            assert all(np.array_equal(bits(o), bits(out)) for o in gathered(comm, out))
            c.rollback()
        got = c.reduce_(Z.Bucket(g.copy(), "b", layout), comm)
        assert np.all(np.isfinite(got))
        assert np.array_equal(got, want), (spec, i)
        c.commit()
    a, b = ref.state_dict(), c.state_dict()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.mpi
@pytest.mark.parametrize("nan_rank", [0, -1])
def test_fp16_scale_vote_treats_nan_alike_on_every_rank(comm, nan_rank):
    """MPI's MAX compares, and comparisons with NaN are false: a raw NaN in the vote gave different
    scales on different ranks. Every rank must agree, and on 1 (the data is sent unscaled)."""
    p, r = comm.Get_size(), comm.Get_rank()
    x = np.full(64, 3.0 + r, np.float32)
    if r == nan_rank % p:
        x[7] = np.nan
    scales = gathered(comm, Z.FP16()._global_scale(x, comm))
    assert scales == [1.0] * p, scales


# -------------------------------------------------------------------------- DataParallel
def train(comm, spec, steps=30, sizes=(12, 32, 16, 3), local=8, dtype=np.float64, lr=0.2):
    """Train under DataParallel(compression=spec); return (params, held-out losses before and
    after, wire stats)."""
    p, r = comm.Get_size(), comm.Get_rank()
    rng = np.random.default_rng(42)
    W = rng.standard_normal((sizes[0], sizes[-1]))
    model = MLP(list(sizes), dtype=dtype, seed=3)
    ddp = dt.DataParallel(model, bucket_mb=0.002, compression=spec)
    opt = optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.SoftmaxCrossEntropy()
    x_eval = np.random.default_rng(999).standard_normal((256, sizes[0])).astype(dtype)
    y_eval = (x_eval @ W).argmax(1)
    losses = [loss_fn.forward(model.forward(x_eval), y_eval)]
    for s in range(steps):
        x = np.random.default_rng(s).standard_normal((local * p, sizes[0])).astype(dtype)
        y = (x @ W).argmax(1)
        xs, ys = x[r * local:(r + 1) * local], y[r * local:(r + 1) * local]
        loss_fn.forward(ddp.forward(xs), ys)
        ddp.backward(loss_fn.backward())
        opt.step()
        opt.zero_grad()
    losses.append(loss_fn.forward(model.forward(x_eval), y_eval))
    return [q.data.copy() for q in model.parameters()], losses, ddp.wire_stats


@pytest.mark.mpi
@pytest.mark.parametrize("spec", ["none", "fp16", "bf16", "topk:0.1", "onebit", "powersgd:2"])
def test_every_compressor_trains_under_data_parallel(comm, spec):
    params, (before, after), stats = train(comm, spec, dtype=np.float32, steps=80, local=16, lr=0.05)
    for q in params:  # all ranks applied the same averaged gradient
        assert all(np.array_equal(g, q) for g in gathered(comm, q))
    assert after < 0.5 * before, (spec, before, after)
    if comm.Get_size() > 1:
        assert stats["calls"] > 0 and stats["payload_bytes"] <= stats["raw_bytes"]


@pytest.mark.mpi
@pytest.mark.parametrize("spec", ["topk:1", "powersgd:16"])
def test_lossless_settings_reproduce_one_process_training(comm, spec):
    """top-k keeping every entry, and PowerSGD whose rank is too high to gain (all sent exactly),
    must reproduce one process on the global batch - the oracle of sync SGD."""
    p = comm.Get_size()
    got, _, _ = train(comm, spec)
    ref_model = MLP([12, 32, 16, 3], dtype=np.float64, seed=3)
    opt = optim.SGD(ref_model.parameters(), lr=0.2, momentum=0.9)
    loss_fn = nn.SoftmaxCrossEntropy()
    W = np.random.default_rng(42).standard_normal((12, 3))
    for s in range(30):
        x = np.random.default_rng(s).standard_normal((8 * p, 12))
        loss_fn.forward(ref_model.forward(x), (x @ W).argmax(1))
        ref_model.backward(loss_fn.backward())
        opt.step()
        opt.zero_grad()
    for a, b in zip(got, ref_model.parameters()):
        assert np.allclose(a, b.data, rtol=1e-9, atol=1e-11)


@pytest.mark.mpi
def test_mismatched_compression_is_an_error_on_every_rank(comm):
    if comm.Get_size() == 1:
        pytest.skip("needs two ranks to disagree")
    spec = "topk:0.1" if comm.Get_rank() == 0 else "onebit"
    with pytest.raises(dt.CollectiveError, match="DataParallel"):
        dt.DataParallel(MLP([4, 3], seed=0), compression=spec)


@pytest.mark.mpi
def test_sixteen_bit_compression_refuses_other_algorithms(comm):
    with pytest.raises(ValueError, match="16-bit-wire ring"):
        dt.DataParallel(MLP([4, 3], seed=0), compression="fp16", algorithm="tree")


@pytest.mark.mpi
@pytest.mark.parametrize("spec", ["topk:0.1", "onebit", "powersgd:2", "fp16"])
def test_data_parallel_skip_and_rollback_equals_never_seeing_the_bad_batch(comm, spec):
    """What the main job does on a skipped step (vote on finite averaged gradients, no optimizer
    step, ``ddp.compressor.rollback()``) must give bit for bit the parameters of a run that never
    saw the bad batch."""
    from disttrain import numerics

    p, r = comm.Get_size(), comm.Get_rank()

    def run(bad_step):
        model = MLP([12, 32, 3], dtype=np.float32, seed=3)
        ddp = dt.DataParallel(model, bucket_mb=0.001, compression=spec)
        opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        loss_fn = nn.SoftmaxCrossEntropy()
        skipped = 0
        for s in range(10):
            if bad_step is None and s == 4:  # the reference never sees step 4's batch
                continue
            x = np.random.default_rng([s, r]).standard_normal((8, 12)).astype(np.float32)
            if s == bad_step and r == p - 1:
                x[2, 4] = np.nan
            loss_fn.forward(ddp.forward(x), np.arange(8) % 3)
            ddp.backward(loss_fn.backward())
            if numerics.all_finite(ddp.parameters()):
                opt.step()
                ddp.compressor.commit()
            else:
                ddp.compressor.rollback()
                skipped += 1
            opt.zero_grad()
        return [q.data.copy() for q in model.parameters()], skipped

    want, _ = run(bad_step=None)
    got, skipped = run(bad_step=4)
    assert skipped == 1
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
