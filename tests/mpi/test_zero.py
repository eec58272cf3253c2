"""ZeRO-1/2/3 (DataParallel shard=...) against ONE process trained on the global batch (float64)."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import nn, optim
from disttrain.checkpoint import CheckpointError
from disttrain.comm import CollectiveError
from disttrain.parallel.units import IN_FLIGHT
from disttrain_zoo.mlp import MLP

# uneven sizes; the 1-element bias and 3-element ones are smaller than most process counts
LOCAL_BATCH, STEPS, SIZES = 3, 5, [5, 11, 1, 3]
MODES = ["none", "optimizer", "gradients", "full"]
OPTIMIZERS = [(optim.Adam, dict(lr=1e-2, weight_decay=1e-3)), (optim.SGD, dict(lr=0.1, momentum=0.9)),
              (optim.LAMB, dict(lr=1e-2))]


def data(n, micro=1):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((STEPS, micro, n, SIZES[0]))
    y = rng.integers(0, SIZES[-1], (STEPS, micro, n))
    return x, y


def reference(n, cls, kw, micro=1):
    """One process, the global batch (micro-batches of n samples accumulated): final parameters."""
    model, loss = MLP(SIZES, dtype=np.float64), nn.SoftmaxCrossEntropy()
    opt = cls(model.parameters(), **kw)
    x, y = data(n, micro)
    for s in range(STEPS):
        for k in range(micro):
            loss.forward(model.forward(x[s, k]), y[s, k])
            model.backward(loss.backward())
        opt.step()
        opt.zero_grad()
    return {q.name: q.data.copy() for q in model.parameters()}


def train(comm, mode, cls, kw, micro=1, **ddp_kw):
    p, r = comm.Get_size(), comm.Get_rank()
    model, loss = MLP(SIZES, dtype=np.float64, seed=r), nn.SoftmaxCrossEntropy()  # different inits ...
    dt.broadcast_parameters(model, root=0)  # ... made rank 0's (seed 0, as the reference)
    ddp = dt.DataParallel(model, shard=mode, **ddp_kw)
    opt = ddp.make_optimizer(cls, **kw)
    x, y = data(LOCAL_BATCH * p, micro)
    mine = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
    for s in range(STEPS):
        for k in range(micro):
            loss.forward(ddp.forward(x[s, k][mine]), y[s, k][mine])
            if k < micro - 1:
                with ddp.no_sync():
                    ddp.backward(loss.backward())
            else:
                ddp.backward(loss.backward())
        opt.step()
        opt.zero_grad()
    return ddp, opt


def assert_same_everywhere(comm, state):
    for name, a in state.items():
        everyone = comm.allgather(a)
        for b in everyone:
            np.testing.assert_array_equal(a, b, err_msg=f"{name} differs between ranks")


def assert_state_is(ddp, want: dict, mode: str) -> None:
    """The gathered parameters equal the one-process run's (float64, rtol 1e-10)."""
    got = ddp.full_state_dict()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-13, err_msg=f"{mode} {name}")


@pytest.mark.mpi
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=["adam", "sgd", "lamb"])  # LAMB: norms from partial sums
@pytest.mark.parametrize("mode", MODES[1:])  # "none" is test_data_parallel.py's
def test_matches_one_process_on_the_global_batch(comm, mode, cls, kw):
    want = reference(LOCAL_BATCH * comm.Get_size(), cls, kw)
    ddp, opt = train(comm, mode, cls, kw, bucket_mb=0.0003)  # several buckets in none/optimizer
    got = ddp.full_state_dict()
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-13, err_msg=f"{mode} {name}")
    if mode != "full":  # the model itself is whole again after opt.step()
        for q in ddp.model.parameters():
            np.testing.assert_allclose(q.data, want[q.name], rtol=1e-10, atol=1e-13, err_msg=q.name)
    assert_same_everywhere(comm, got)
    if mode != "none":  # state keyed by global names, one shard parameter per global parameter
        assert [q.name for q in opt.params] == [q.name for b in ddp.buckets for q in b.params]
        assert set(opt.state) <= set(want)
        for q in opt.params:  # each shard's layout says which flat range of the global array it holds
            (piece,) = q.layout
            assert piece.shape == want[q.name].shape and piece.box == tuple((0, n) for n in piece.shape)
            np.testing.assert_array_equal(q.data, got[q.name].reshape(-1)[piece.flat[0]:piece.flat[1]], err_msg=q.name)


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["optimizer", "full"])  # gradients reduce-scatters as full does
def test_ring_reduce_scatter_and_allgather(comm, mode):
    """algorithm="ring" runs the gradients' reduce-scatter and the parameters' allgathers on the
    ring (blocks of 0 or 1 element at 8 ranks included)."""
    cls, kw = OPTIMIZERS[0]
    want = reference(LOCAL_BATCH * comm.Get_size(), cls, kw)
    ddp, _ = train(comm, mode, cls, kw, algorithm="ring", bucket_mb=0.0003)
    assert ddp._zero.gather_algorithm == "ring"
    assert_state_is(ddp, want, mode)


@pytest.mark.mpi
@pytest.mark.parametrize("mode", MODES[1:])
def test_no_sync_accumulates_micro_batches(comm, mode):
    cls, kw = OPTIMIZERS[1]
    want = reference(LOCAL_BATCH * comm.Get_size(), cls, kw, micro=2)
    ddp, _ = train(comm, mode, cls, kw, micro=2)
    assert_state_is(ddp, want, mode)


@pytest.mark.mpi
@pytest.mark.parametrize("mode", MODES[1:])
def test_memory_and_shards_scale_as_promised(comm, mode):
    """Summed over the ranks, owned optimizer state / gradients / parameters are exactly one copy."""
    ddp, opt = train(comm, mode, *OPTIMIZERS[0])
    # traffic (ring volumes): ZeRO-1/2 move what an allreduce moves (reduce-scatter + allgather), ZeRO-3 1.5x
    w = ddp.wire_stats  # (before full_state_dict, which gathers once more)
    assert w["allgather_sent_bytes"] == (2 if mode == "full" else 1) * w["reduce_scatter_sent_bytes"]
    total = sum(q.size for q in ddp.full_state_dict().values()) * 8
    mem = ddp.memory()
    everyone = comm.allgather(mem)
    p = comm.Get_size()
    assert sum(m["optimizer"] for m in everyone) == 2 * total  # Adam: m and v, 1/P each
    assert mem["optimizer"] <= 2 * total // p + 2 * 8 * len(ddp.params)  # at most one element more per tensor
    if mode in ("gradients", "full"):
        assert sum(m["gradients"] for m in everyone) == total
        assert mem["transient"] == 0 and mem["peak_transient"] > 0
        # whole gradients of at most IN_FLIGHT units waiting for their reduce-scatter + the one running
        assert mem["peak_transient"] <= (IN_FLIGHT + 1 + (mode == "full") * 2) * max(b.size for b in ddp.buckets) * 8
    else:
        assert mem["gradients"] >= total
    if mode == "full":
        assert sum(m["parameters"] for m in everyone) == total
        assert mem["peak_transient"] <= 2 * 2 * max(b.size for b in ddp.buckets) * 8  # ~two units' params + grads
    else:
        assert mem["parameters"] == total
    # parameter_shards: live views; with full, the ranks' flat ranges tile each parameter exactly
    sh = ddp.parameter_shards()
    cover = {}
    for s in (x for ranks in comm.allgather([(s.name, s.flat, s.data.size) for s in sh]) for x in ranks):
        cover.setdefault(s[0], []).append(s)
    for name, a in ddp.full_state_dict().items():
        pieces = cover[name] if mode == "full" else cover[name][:1]
        assert sum(n for _, _, n in pieces) == a.size, name
    if mode == "full" and sh:
        before = opt.params[0].data.copy()
        sh[0].data[...] += 1  # a view of what the optimizer updates
        np.testing.assert_array_equal(opt.params[0].data, before + 1)


@pytest.mark.mpi
def test_dp_x_tp_mesh_shards_the_tensor_parallel_blocks(comm):
    p = comm.Get_size()
    if p % 2 or p < 4:
        pytest.skip("needs an even number of ranks >= 4 (dp >= 2 x tp 2)")
    sizes = [6, 8, 4, 3]
    cls, kw = OPTIMIZERS[0]
    with dt.Mesh(p // 2, 1, 2) as mesh:
        dp, dr = mesh.dp, mesh.dp_rank
        rng = np.random.default_rng(3)
        x = rng.standard_normal((STEPS, LOCAL_BATCH * dp, sizes[0]))
        y = rng.integers(0, sizes[-1], (STEPS, LOCAL_BATCH * dp))
        ref, loss = MLP(sizes, dtype=np.float64), nn.SoftmaxCrossEntropy()
        ropt = cls(ref.parameters(), **kw)
        for s in range(STEPS):
            loss.forward(ref.forward(x[s]), y[s])
            ref.backward(loss.backward())
            ropt.step()
            ropt.zero_grad()
        want = {q.name: q.data for q in ref.parameters()}
        for mode in MODES[1:]:
            model = MLP(sizes, dtype=np.float64, tp_group=mesh.tp_group)
            model.parameters()
            ddp = dt.DataParallel(model, shard=mode, group=mesh.dp_group)
            opt = ddp.make_optimizer(cls, **kw)
            mine = slice(dr * LOCAL_BATCH, (dr + 1) * LOCAL_BATCH)
            for s in range(STEPS):
                loss.forward(ddp.forward(x[s][mine]), y[s][mine])
                ddp.backward(loss.backward())
                opt.step()
                opt.zero_grad()
            got = ddp.full_state_dict()
            for q in model.parameters():
                box = q.layout[0].box if q.layout else tuple((0, n) for n in q.data.shape)
                np.testing.assert_allclose(got[q.name], want[q.name][tuple(slice(a, b) for a, b in box)],
                                           rtol=1e-10, atol=1e-13, err_msg=f"{mode} {q.name}")
            for sp in opt.params:  # a ZeRO range of a tensor-parallel block names the global array
                (piece,) = sp.layout
                block = want[sp.name][tuple(slice(a, b) for a, b in piece.box)].reshape(-1)
                assert piece.shape == want[sp.name].shape
                np.testing.assert_allclose(sp.data, block[piece.flat[0]:piece.flat[1]], rtol=1e-10, atol=1e-13)


class RaiseOnRank(nn.Module):
    """Identity; its backward raises on one rank at one step."""

    def __init__(self, rank, step):
        self.rank, self.step, self.calls = rank, step, 0

    def forward(self, x):
        return x

    def backward(self, dy):
        self.calls += 1
        if dt.rank() == self.rank and self.calls == self.step:
            raise ZeroDivisionError("injected")
        return dy


@pytest.mark.mpi
@pytest.mark.parametrize("mode", MODES[1:])
def test_a_rank_that_raises_in_backward_makes_every_rank_raise(comm, mode):
    p = comm.Get_size()
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(4, 5, rng=rng, dtype=np.float64), nn.ReLU(), RaiseOnRank(p - 1, 2),
                          nn.Linear(5, 3, rng=rng, dtype=np.float64))
    ddp, loss = dt.DataParallel(model, shard=mode), nn.SoftmaxCrossEntropy()
    opt = ddp.make_optimizer(optim.SGD, lr=0.1, momentum=0.9)
    x, y = rng.standard_normal((4, 4)), rng.integers(0, 3, 4)
    loss.forward(ddp.forward(x), y)
    ddp.backward(loss.backward())
    opt.step()
    loss.forward(ddp.forward(x), y)
    with pytest.raises((ZeroDivisionError, CollectiveError)):
        ddp.backward(loss.backward())
    comm.Barrier()  # nothing left in flight: every rank got here


@pytest.mark.mpi
def test_refusals_are_raised_on_every_rank(comm):
    class WholeTensors(optim.SGD):  # needs whole tensors and offers no partial sums
        whole_tensor_update = True

    model = MLP(SIZES, dtype=np.float64)
    with pytest.raises(ValueError, match="whole-tensor"):
        dt.DataParallel(model, shard="optimizer").make_optimizer(WholeTensors, lr=1e-3)
    with pytest.raises(CollectiveError, match="shard must be one of"):
        dt.DataParallel(MLP(SIZES, dtype=np.float64), shard="zero3")
    with pytest.raises(CollectiveError, match="needs the full gradient"):
        dt.DataParallel(MLP(SIZES, dtype=np.float64), shard="gradients", compression="topk:0.5")
    with pytest.raises(CollectiveError, match="shard must be one of"):  # ranks disagree: all raise
        dt.DataParallel(MLP(SIZES, dtype=np.float64), shard="full" if comm.Get_rank() else "zero3")
    comm.Barrier()


@pytest.mark.mpi
def test_optimizer_mode_with_fp16_compression_keeps_the_owned_slice(comm):
    """shard="optimizer" allreduces through a compressor, then keeps the owned slice: the same
    parameters as shard="none" with the same compressor, bit for bit."""
    cls, kw = OPTIMIZERS[1]
    a, _ = train(comm, "none", cls, kw, compression="fp16")
    b, _ = train(comm, "optimizer", cls, kw, compression="fp16")
    sa, sb = a.full_state_dict(), b.full_state_dict()
    for name in sa:
        np.testing.assert_array_equal(sa[name], sb[name], err_msg=name)


class RaiseInForward(RaiseOnRank):
    def forward(self, x):
        self.calls += 1
        if dt.rank() == self.rank and self.calls == self.step:
            raise ZeroDivisionError("injected")
        return x

    def backward(self, dy):
        return dy


@pytest.mark.mpi
@pytest.mark.parametrize("where", ["middle", "last"])
def test_full_a_rank_that_raises_in_forward_makes_every_rank_raise(comm, where):
    """shard="full" communicates in forward too: the failing rank submits the rest of the step
    (forward and backward plans) carrying the error; peers raise in their forward (middle) or in
    their backward (the failure was in the last unit), and the next step trains again."""
    p = comm.Get_size()
    rng = np.random.default_rng(0)
    layers = [nn.Linear(4, 5, rng=rng, dtype=np.float64), nn.Linear(5, 5, rng=rng, dtype=np.float64),
              nn.Linear(5, 3, rng=rng, dtype=np.float64)]
    bad = Sequential_with(layers, RaiseInForward(p - 1, 2), 1 if where == "middle" else 3)
    ddp, loss = dt.DataParallel(bad, shard="full"), nn.SoftmaxCrossEntropy()
    opt = ddp.make_optimizer(optim.SGD, lr=0.1)
    x, y = rng.standard_normal((4, 4)), rng.integers(0, 3, 4)
    for step in range(3):
        try:
            loss.forward(ddp.forward(x), y)
            ddp.backward(loss.backward())
            opt.step()
            assert step != 1, "step 1 must raise on every rank"
        except (ZeroDivisionError, CollectiveError):
            assert step == 1
        opt.zero_grad()
    assert all(np.isfinite(v).all() for v in ddp.full_state_dict().values())
    comm.Barrier()


def Sequential_with(layers, extra, at):
    return nn.Sequential(*layers[:at], extra, *layers[at:])


@pytest.mark.mpi
@pytest.mark.parametrize("mode", MODES[1:])
def test_a_rank_without_samples_synchronizes(comm, mode):
    """Rank 0 has no samples and calls synchronize(): the average over the ranks is the global
    batch's gradient times (P-1)/P, i.e. momentum SGD on the other ranks' samples at lr (P-1)/P."""
    p, r = comm.Get_size(), comm.Get_rank()
    if p == 1:
        pytest.skip("needs a rank with samples")
    lr = 0.1
    want = reference(LOCAL_BATCH * (p - 1), optim.SGD, dict(lr=lr * (p - 1) / p, momentum=0.9))
    model, loss = MLP(SIZES, dtype=np.float64), nn.SoftmaxCrossEntropy()
    ddp = dt.DataParallel(model, shard=mode)
    opt = ddp.make_optimizer(optim.SGD, lr=lr, momentum=0.9)
    x, y = data(LOCAL_BATCH * (p - 1))
    mine = slice((r - 1) * LOCAL_BATCH, r * LOCAL_BATCH)
    for s in range(STEPS):
        if r == 0:
            ddp.synchronize()
        else:
            loss.forward(ddp.forward(x[s, 0][mine]), y[s, 0][mine])
            ddp.backward(loss.backward())
        opt.step()
        opt.zero_grad()
    assert_state_is(ddp, want, mode)


@pytest.mark.mpi
def test_full_units_in_another_order_still_pair_and_a_unit_twice_in_backward_is_refused(comm):
    """Every rank submits the plan up to the gather it needs, so a forward that runs its units in
    another order than model.children() gives the unsharded result; a unit whose backward runs
    twice in one step cannot be paired by plan: every rank raises (the same model everywhere)."""

    class Backwards(nn.Sequential):
        def forward(self, x):
            return self.layers[0].forward(self.layers[1].forward(x))

        def backward(self, dy):
            return self.layers[1].backward(self.layers[0].backward(dy))

    class Twice(Backwards):
        def backward(self, dy):
            self.layers[1].backward(self.layers[0].backward(dy))
            return self.layers[1].backward(dy)

    def make(cls):
        rng = np.random.default_rng(0)
        return cls(nn.Linear(3, 3, rng=rng, dtype=np.float64), nn.Linear(3, 3, rng=rng, dtype=np.float64))
    x = np.random.default_rng(1).standard_normal((2, 3))
    want = make(Backwards).forward(x)
    ddp = dt.DataParallel(make(Backwards), shard="full")
    ddp.make_optimizer(optim.SGD, lr=0.1)
    np.testing.assert_allclose(ddp.forward(x), want, rtol=1e-14)
    ddp.backward(np.ones_like(want))
    ddp = dt.DataParallel(make(Twice), shard="full")
    ddp.make_optimizer(optim.SGD, lr=0.1)
    ddp.forward(x)
    with pytest.raises((RuntimeError, CollectiveError), match="ran twice|rank"):
        ddp.backward(np.ones_like(want))
    comm.Barrier()


@pytest.mark.mpi
@pytest.mark.parametrize("mode", MODES[1:])
def test_training_without_make_optimizer_is_refused_on_every_rank(comm, mode):
    """An optimizer over model.parameters() would never see the averaged gradients (they go to the
    owned shards): the first backward refuses on every rank instead of training on nothing."""
    model, loss = MLP(SIZES, dtype=np.float64), nn.SoftmaxCrossEntropy()
    ddp = dt.DataParallel(model, shard=mode)
    loss.forward(ddp.forward(np.ones((2, SIZES[0]))), np.zeros(2, int))
    with pytest.raises((RuntimeError, CollectiveError), match="make_optimizer|rank"):
        ddp.backward(loss.backward())
    comm.Barrier()


@pytest.mark.mpi
def test_a_model_sharded_twice_is_refused(comm):
    model = MLP(SIZES, dtype=np.float64)
    dt.DataParallel(model, shard="full")
    with pytest.raises(CollectiveError, match="already driven"):
        dt.DataParallel(model, shard="gradients")


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["none", "full"])
def test_ranks_that_build_different_optimizers_all_raise(comm, mode):
    """Rank 0 asks for LAMB, the others for Adam (or the same class with another lr): "none"
    would drift apart silently, "full" would hang in LAMB's norm allreduce - every rank raises."""
    if comm.Get_size() == 1:
        pytest.skip("one rank cannot disagree with itself")
    model = MLP(SIZES, dtype=np.float64)
    ddp = dt.DataParallel(model, shard=mode)
    with pytest.raises(CollectiveError, match="make_optimizer.*differ"):
        ddp.make_optimizer(optim.LAMB if comm.Get_rank() == 0 else optim.Adam, lr=1e-2)
    with pytest.raises(CollectiveError, match="make_optimizer.*differ"):
        ddp.make_optimizer(optim.Adam, lr=1e-2 if comm.Get_rank() == comm.Get_size() - 1 else 1e-3)
    ddp.make_optimizer(optim.Adam, lr=1e-2)  # agreeing ranks still get their optimizer
    comm.Barrier()


@pytest.mark.mpi
def test_checkpoint_of_a_full_sharded_model_without_ddp_is_refused_not_nan(comm, tmp_path_factory):
    """shard="full" leaves NaN stand-ins in the model: save_checkpoint(model=...) without ddp=
    wrote them as the weights (a checkpoint of NaN, silently). Every rank refuses instead; with
    ddp= the whole, finite parameters come back."""
    d = comm.bcast(str(tmp_path_factory.mktemp("ck")) if comm.Get_rank() == 0 else None)
    model = MLP(SIZES, dtype=np.float64)
    ddp = dt.DataParallel(model, shard="full")
    opt = ddp.make_optimizer(optim.SGD, lr=0.1)
    with pytest.raises(CheckpointError, match="read-only"):
        dt.save_checkpoint(d, 1, model=model, optimizer=opt)
    dt.save_checkpoint(d, 2, ddp=ddp, optimizer=opt)
    with pytest.raises(CheckpointError, match="read-only"):
        dt.load_checkpoint(d, model=model)  # a stand-in cannot be filled: refused before anything is read
    fresh = MLP(SIZES, dtype=np.float64, seed=5)
    dt.load_checkpoint(d, model=fresh)
    want = ddp.full_state_dict()
    for q in fresh.parameters():
        np.testing.assert_array_equal(q.data, want[q.name])
    comm.Barrier()


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["none", "full"])
def test_a_rank_that_skips_its_optimizer_step_makes_every_rank_raise(comm, mode):
    """Rank 0 skips opt.step() once (a local non-finite check on its own slice, say). shard="full"
    has no collective in the step, so its slices stayed one step behind while the others moved on
    and training went on silently (the gathered model a mix of two steps); "none" drifted apart.
    The next step's collectives now compare the optimizer's step counts: every rank raises."""
    if comm.Get_size() == 1:
        pytest.skip("one rank cannot disagree with itself")
    model, loss = MLP(SIZES, dtype=np.float64), nn.SoftmaxCrossEntropy()
    ddp = dt.DataParallel(model, shard=mode)
    opt = ddp.make_optimizer(optim.SGD, lr=0.1)
    x, y = data(LOCAL_BATCH)
    with pytest.raises(CollectiveError, match="optimizer_steps"):
        for s in range(3):
            loss.forward(ddp.forward(x[s, 0]), y[s, 0])
            ddp.backward(loss.backward())
            if not (s == 1 and comm.Get_rank() == 0):
                opt.step()
            opt.zero_grad()
    comm.Barrier()


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["none", "optimizer"])  # gradients/full: .grad is a read-only stand-in
def test_opt_zero_grad_clears_what_was_written_into_the_model_grads_after_a_step(comm, mode):
    """attack5: with shard="optimizer" the model's .grad views the whole bucket, which the job zeroes
    right after its reduce-scatter - so whatever was written into it after backward (a gradient
    term added by hand, an extra diagnostic backward, garbage) survived ``opt.zero_grad()`` (which
    zeroes the owned slices only) and entered the next step's average on every rank. Now
    opt.zero_grad() clears the buckets as with shard="none": the one-process run's parameters."""
    p, r = comm.Get_size(), comm.Get_rank()
    want = reference(LOCAL_BATCH * p, optim.SGD, dict(lr=0.1, momentum=0.9))
    model, loss = MLP(SIZES, dtype=np.float64), nn.SoftmaxCrossEntropy()
    ddp = dt.DataParallel(model, shard=mode)
    opt = ddp.make_optimizer(optim.SGD, lr=0.1, momentum=0.9)
    x, y = data(LOCAL_BATCH * p)
    mine = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
    for s in range(STEPS):
        loss.forward(ddp.forward(x[s, 0][mine]), y[s, 0][mine])
        ddp.backward(loss.backward())
        opt.step()
        if r == p - 1:
            for q in model.parameters():
                q.grad[...] = 7.0  # after the step: must not reach the next one
        opt.zero_grad()
    assert_state_is(ddp, want, mode)
