"""Interleaved, zero-bubble and recomputing pipelines reproduce ONE process trained on the global
batch (float64), at every pipeline depth the suite runs; bad sizes raise on every rank."""
import time

import numpy as np
import pytest

import disttrain as dt
from disttrain import nn
from disttrain.comm.errors import CollectiveError
from disttrain.parallel.mesh import Mesh
from disttrain.parallel.pipeline import SCHEDULES, Pipeline, assign, channel
from disttrain.parallel.pipeline.schedules import kept, problem

from .test_model_parallel import CLASSES, D, batches, pipeline_shape, sgd, train_reference

STEPS, B = 2, 120  # B: samples per replica, divisible by every m below (1..6, 8, 10)


def units(n, rng, dropout=False):
    """n pipeline units of uneven widths (Linear + activation [+ dropout]) and a Linear head."""
    acts = [nn.ReLU, nn.Tanh, nn.GELU]
    sizes = [D] + [7 + (5 * i) % 11 for i in range(n - 1)] + [CLASSES]
    out = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b, rng=rng, dtype=np.float64, input_grad=i > 0, init="xavier" if i == n - 1 else "kaiming")
        if i == n - 1:
            out.append(lin)
            continue
        extra = [nn.Dropout(0.3, rng=np.random.default_rng(50 + i))] if dropout else []
        out.append(nn.Sequential(lin, acts[i % 3](), *extra))
    return out


def build(mesh, schedule, m, v, recompute="none", dropout=False, n=None, **kw):
    """(pipeline, this rank's parameters in global order, the reference units) for the mesh."""
    pp = mesh.pp
    n = n or pp * v + 1
    ref = units(n, np.random.default_rng(2), dropout)
    mine = units(n, np.random.default_rng(2), dropout)
    nn.Sequential(*mine).parameters()  # global names before the cut
    chunks = [nn.Sequential(*mine[a:b]) for a, b in assign([1.0] * n, pp, v)[mesh.pp_rank]]
    stage = nn.Sequential(*chunks) if v > 1 else chunks[0]
    mod = dt.DataParallel(stage, group=mesh.dp_group, bucket_mb=0.001) if mesh.dp > 1 else stage
    pipe = Pipeline(mod, mesh.pp_group, nn.SoftmaxCrossEntropy() if mesh.pp_is_last_stage else None,
                    schedule=schedule, micro_batches=m, virtual_stages=v, recompute=recompute, **kw)
    return pipe, stage, ref


def train_pipe(pipe, stage, mesh, data):
    opt, got = sgd(stage.parameters()), []
    rows = slice(mesh.dp_rank * B, (mesh.dp_rank + 1) * B)
    for x, y in data:
        got.append(pipe.step(x[rows] if mesh.pp_is_first_stage else None, y[rows] if mesh.pp_is_last_stage else None))
        opt.step()
        opt.zero_grad()
    return got


def assert_matches(stage, ref, got, want, dp):
    if dp == 1:
        np.testing.assert_allclose(got, want, rtol=1e-10)
    ref_p = {q.name: q.data for q in nn.Sequential(*ref).parameters()}
    for q in stage.parameters():
        np.testing.assert_allclose(q.data, ref_p[q.name], rtol=1e-10, atol=1e-12, err_msg=q.name)


M = {"1": lambda p: 1, "4": lambda p: 4, "8": lambda p: 8, "p": lambda p: p, "2p": lambda p: 2 * p}
CASES = [("interleaved", v, m) for v in (2, 3) for m in M] + [(zb, 1, m) for zb in ("zb1", "zb2") for m in ("1", "4", "8", "2p")]


@pytest.mark.mpi
@pytest.mark.parametrize("schedule,v,m_", CASES)
def test_schedule_matches_one_process(comm, schedule, v, m_):
    """Pure pipelines over all ranks (dp2 x pp4 at 8), m = 1, 4, 8, p, 2p; sizes the schedule refuses
    (or that repeat another case) are skipped here - the refusals are tested below."""
    dp, pp = pipeline_shape(comm.Get_size())
    m = M[m_](pp)
    if m_ in ("p", "2p") and m in (1, 4, 8):
        pytest.skip(f"m = {m} is already a case")
    if problem(schedule, pp, m, v):
        pytest.skip(problem(schedule, pp, m, v))
    mesh = Mesh(dp=dp, pp=pp)
    data = batches(STEPS, dp * B)
    pipe, stage, ref = build(mesh, schedule, m, v)
    want = train_reference(nn.Sequential(*ref), data)
    got = train_pipe(pipe, stage, mesh, data)
    assert_matches(stage, ref, got, want, dp)
    fn = SCHEDULES[schedule]  # the runtime's own count = the op list's = the closed form
    assert pipe.stats["peak_live"] == kept(pipe.ops, fn.split) == fn.live(mesh.pp_rank, pp, m, v), pipe.stats
    if schedule == "zb1":  # at most p micro-batches whose W has not run, on every stage
        assert pipe.stats["peak_live"] <= min(m, pp)
    if schedule == "zb2":  # 2p - 1 (Qi et al. 2023: twice 1F1B's first stage), on every stage
        assert pipe.stats["peak_live"] == min(m, 2 * pp - 1)
    st = pipe.stats  # the compute per op kind and chunk (the benchmark's played theory) adds up
    assert sum(map(sum, st["op_s"].values())) == pytest.approx(st["compute_s"], rel=1e-9)
    assert all(len(t) == v for t in st["op_s"].values()) and min(st["op_s"]["F"]) > 0
    assert (sum(st["op_s"]["W"]) > 0) == fn.split and st["t0"] <= st["t1"]


@pytest.mark.mpi
@pytest.mark.parametrize("schedule,v,m_", [("1f1b", 1, "1"), ("zb1", 1, "p+1"), ("interleaved", 2, "p")])
def test_both_transports_give_the_one_process_result(comm, schedule, v, m_):
    """The shared-memory channel (the default) and MPI: uneven micro-batches (m does not divide the
    batch), m = 1, three steps (headers, then known shapes) - both equal one process, and each other
    bit for bit; in a known-shape step every message between stages (one node) goes through the
    channel's slots and no MPI receive is posted, with MPI none does."""
    dp, pp = pipeline_shape(comm.Get_size())
    m = {"1": 1, "p+1": pp + 1, "p": pp}[m_]
    n = 3 * m + 2 if m > 1 else 5  # samples per replica
    mesh = Mesh(dp=dp, pp=pp)
    data = batches(3, dp * n, seed=31)
    rows = slice(mesh.dp_rank * n, (mesh.dp_rank + 1) * n)
    got = {}
    for transport in ("shm", "mpi"):
        pipe, stage, ref = build(mesh, schedule, m, v, transport=transport, uneven=True)
        want = train_reference(nn.Sequential(*ref), data)
        opt, losses = sgd(stage.parameters()), []
        for k, (x, y) in enumerate(data):
            losses.append(pipe.step(x[rows] if mesh.pp_is_first_stage else None, y[rows] if mesh.pp_is_last_stage else None))
            opt.step()
            opt.zero_grad()
            assert pipe.net.known == (k > 0)
            slots = set(pipe.net._inbound)
            if k and transport == "shm" and pp > 1:
                assert slots == {e[1:] for e in pipe._expected} and not pipe.net.posted, (slots, pipe.net.posted)
                assert pipe.net.sent > 0
            else:
                assert not slots and not pipe.net._outbound
        assert_matches(stage, ref, losses, want, dp)
        got[transport] = [q.data.copy() for q in stage.parameters()]
    for a, b in zip(got["shm"], got["mpi"]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.mpi(min_size=2)
def test_stages_that_remember_different_shapes_raise_on_every_rank(comm):
    """The channel's slots are laid out from what each side remembers of the last step: a sender
    whose memory differs from its receiver's (here: stage 0's, tampered) is a CollectiveError on
    every rank when the known-shape step starts - not a hang, not a slot read with another shape."""
    p = comm.Get_size()
    mesh = Mesh(pp=p)
    pipe, stage, _ = build(mesh, "1f1b", 2, 1, transport="shm")
    x, y = batches(1, 8)[0]
    pipe.step(x if mesh.pp_is_first_stage else None, y if mesh.pp_is_last_stage else None)
    if mesh.pp_rank == 0:
        key = next(iter(pipe.net.sent_shapes))
        tup, ((dtype, shape),) = pipe.net.sent_shapes[key]
        pipe.net.sent_shapes[key] = (tup, ((dtype, (shape[0] + 1, *shape[1:])),))
    with pytest.raises(CollectiveError, match="stage 0 would send stage 1 .* remember different shapes"):
        pipe.step(x if mesh.pp_is_first_stage else None, y if mesh.pp_is_last_stage else None)


@pytest.mark.mpi(min_size=2)
def test_growing_batches_give_windows_back_and_the_same_losses(comm):
    """Batches that grow (token budgets, buckets) lay the channel out again at every new size: the
    group's pool of shared windows gives back the ones no rank uses or views any more (it held
    the sum of every layout: attack8, finding 01 - 6 windows here before), and the losses stay
    those of the MPI transport on the same model, step by step (bitwise)."""
    mesh = Mesh(pp=comm.Get_size())
    shm, _, _ = build(mesh, "1f1b", 2, 1, transport="shm")
    ref, _, _ = build(mesh, "1f1b", 2, 1, transport="mpi")
    rng = np.random.default_rng(7)
    sizes = [4, 4, 8, 8, 16, 16, 32, 32, 64, 64, 128, 128, 4, 4]
    most = 0
    for b in sizes:
        x, y = rng.standard_normal((b, D)), rng.integers(0, CLASSES, b)
        args = (x if mesh.pp_is_first_stage else None, y if mesh.pp_is_last_stage else None)
        assert shm.step(*args) == ref.step(*args)
        pool = channel._pools.get(mesh.pp_group.uid, [])  # none before the first known-shape step
        most = max([most] + [w.nbytes for w in pool])
        assert len(pool) <= 3, [w.nbytes for w in pool]
    assert len(pool) and sum(w.nbytes for w in pool) <= 3 * most


@pytest.mark.mpi
@pytest.mark.parametrize("schedule,v", [("1f1b", 1), ("interleaved", 2), ("zb1", 1)])
@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_recompute_is_exact_and_keeps_less(comm, schedule, v, recompute):
    """With dropout (the masks must be drawn again identically): recomputation gives the same bits
    as keeping the activations, and keeps fewer bytes (the runtime's own accounting)."""
    dp, pp = pipeline_shape(comm.Get_size())
    m = 2 * pp
    mesh = Mesh(dp=dp, pp=pp)
    data = batches(STEPS, dp * B)
    runs = {}
    for mode in ("none", recompute):
        pipe, stage, _ = build(mesh, schedule, m, v, mode, dropout=True, n=2 * pp * v)
        train_pipe(pipe, stage, mesh, data)
        runs[mode] = (pipe.stats, [q.data.copy() for q in stage.parameters()])
    for a, b in zip(runs["none"][1], runs[recompute][1]):
        np.testing.assert_array_equal(a, b)
    kept, plain = runs[recompute][0], runs["none"][0]
    assert kept["peak_activation_bytes"] < plain["peak_activation_bytes"], (kept, plain)
    assert kept["recompute_s"] > 0 and plain["recompute_s"] == 0


@pytest.mark.mpi
def test_hybrid_dp_x_interleaved_and_zb1(comm):
    """dp2 x pp2 at 4 ranks: every backward under no_sync, then one dp allreduce per step."""
    if comm.Get_size() != 4:
        pytest.skip("dp2 x pp2 needs 4 ranks (run by the 4-rank suite)")
    mesh = Mesh(dp=2, pp=2)
    data = batches(STEPS, 2 * B)
    for schedule, v, recompute in (("interleaved", 2, "selective"), ("zb1", 1, "full")):
        pipe, stage, ref = build(mesh, schedule, 4, v, recompute)
        train_reference(nn.Sequential(*ref), data)
        assert_matches(stage, ref, train_pipe(pipe, stage, mesh, data), None, 2)


@pytest.mark.mpi
def test_bad_schedule_sizes_raise_on_every_rank(comm):
    p = comm.Get_size()
    mesh = Mesh(pp=p)
    two = nn.Sequential(nn.Linear(D, D, dtype=np.float64), nn.Linear(D, D, dtype=np.float64))
    loss = nn.MSE() if mesh.pp_is_last_stage else None
    if p > 1:
        with pytest.raises(CollectiveError, match=f"must be a multiple of {p}"):
            Pipeline(two, mesh.pp_group, loss, "interleaved", micro_batches=p + 1, virtual_stages=2)
    with pytest.raises(CollectiveError, match="need the interleaved schedule"):
        Pipeline(two, mesh.pp_group, loss, "1f1b", micro_batches=p, virtual_stages=2)
    with pytest.raises(CollectiveError, match="nn.Sequential of this rank's 3 chunks"):
        Pipeline(two, mesh.pp_group, loss, "interleaved", micro_batches=p, virtual_stages=3)
    with pytest.raises(CollectiveError, match="recompute must be one of"):
        Pipeline(two, mesh.pp_group, loss, "zb1", micro_batches=p, recompute="some")
    with pytest.raises(CollectiveError, match="transport must be one of"):
        Pipeline(two, mesh.pp_group, loss, "zb1", micro_batches=p, transport="tcp")
    pipe = Pipeline(two, mesh.pp_group, loss, "zb1", micro_batches=2)
    first, last = mesh.pp_is_first_stage, mesh.pp_is_last_stage
    with pytest.raises(CollectiveError, match="divide into 2 micro-batches"):  # zero samples
        pipe.step(np.zeros((0, D)) if first else None, np.zeros((0, D)) if last else None)
    if p == 1:
        return
    with pytest.raises(CollectiveError, match="batch has 4 samples but the last stage's targets 6"):
        pipe.step(np.zeros((4, D)) if first else None, np.zeros((6, D)) if last else None)
    # ranks that disagree (one rank asks for another schedule) raise everywhere, no hang
    with pytest.raises(CollectiveError):
        Pipeline(two, mesh.pp_group, loss, "zb1" if mesh.pp_rank == p - 1 else "1f1b", micro_batches=p)
    with pytest.raises(CollectiveError, match="transport"):  # one rank's messages on MPI, the others' in slots
        Pipeline(two, mesh.pp_group, loss, "1f1b", micro_batches=p, transport="mpi" if mesh.pp_rank == 0 else "shm")


@pytest.mark.mpi
@pytest.mark.parametrize("cache_shapes", [True, False])
def test_changing_batch_shapes_and_evaluation_between_steps(comm, cache_shapes):
    """Known-shape steps (no headers, receives posted up front) follow header steps only while the
    input shape repeats: batches of 120, 120, 60, 60, 120 samples and an evaluation in between give
    the one-process result."""
    dp, pp = pipeline_shape(comm.Get_size())
    mesh = Mesh(dp=dp, pp=pp)
    sizes = [B, B, B // 2, B // 2, B]
    data = [batches(1, dp * n, seed=20 + k)[0] for k, n in enumerate(sizes)]
    schedule, v = ("interleaved", 2) if pp in (2, 4) else ("zb1", 1)
    pipe, stage, ref = build(mesh, schedule, 4 if pp != 3 else 3, v)
    pipe.net.cache = cache_shapes
    model, loss_fn = nn.Sequential(*ref), nn.SoftmaxCrossEntropy()
    opt_ref, opt = sgd(model.parameters()), sgd(stage.parameters())
    for k, (x, y) in enumerate(data):
        n = len(x) // dp
        want = loss_fn.forward(model.forward(x), y)
        model.backward(loss_fn.backward())
        opt_ref.step()
        opt_ref.zero_grad()
        rows = slice(mesh.dp_rank * n, (mesh.dp_rank + 1) * n)
        got = pipe.step(x[rows] if mesh.pp_is_first_stage else None, y[rows] if mesh.pp_is_last_stage else None)
        opt.step()
        opt.zero_grad()
        assert pipe.net.known == (cache_shapes and k in (1, 3)), k
        if dp == 1:
            assert got == pytest.approx(want, rel=1e-10)
        if k == 1:
            ev = data[0][0][:7]
            np.testing.assert_allclose(pipe.predict(ev if mesh.pp_is_first_stage else None), model.forward(ev),
                                       rtol=1e-10)
    assert_matches(stage, ref, [], [], 2)


@pytest.mark.mpi(min_size=2)
def test_an_input_of_another_dtype_and_the_same_shape_is_not_a_known_shape_step(comm):
    """float64, float64, then float32 batches of one shape through stages without parameters of
    their own (Tanh: the dtype travels): the third step sends headers again and matches one
    process - it was taken for a known-shape step, and the first stage raised (alone) that its
    activation's shape "depends on the data"."""
    r, p = comm.Get_rank(), comm.Get_size()
    lin = lambda: nn.Linear(6, 3, rng=np.random.default_rng(4), dtype=np.float64)  # noqa: E731
    stage = lin() if r == p - 1 else nn.Tanh()
    pipe = Pipeline(stage, dt.new_group(range(p)), nn.SoftmaxCrossEntropy() if r == p - 1 else None, "1f1b",
                    micro_batches=2)
    ref, loss_fn = nn.Sequential(*[nn.Tanh() for _ in range(p - 1)], lin()), nn.SoftmaxCrossEntropy()
    x, y = np.random.default_rng(5).standard_normal((4, 6)), np.arange(4) % 3
    known = []
    for dtype in (np.float64, np.float64, np.float32):
        got = pipe.step(x.astype(dtype), y)
        known.append(pipe.net.known)
        assert got == pytest.approx(loss_fn.forward(ref.forward(x.astype(dtype)), y), rel=1e-6)
    assert known == [False, True, False]


class _Slow(nn.Module):
    """A stage that takes `t` seconds per forward (a sleep) and passes its input on."""

    def __init__(self, t):
        self.t = t

    def forward(self, x):
        time.sleep(self.t)
        self._x = x
        return x

    def backward(self, dy):
        return dy


@pytest.mark.mpi
def test_waiting_is_told_apart_from_the_runtimes_own_time(comm):
    """Stats split a stage's first-to-last-op time into compute, waiting for a message (wait_s) and
    the runtime's own time (runtime_s): behind a first stage that sleeps 40 ms per forward, every
    later stage waits for most of its 4 micro-batches x 40 ms and that is not counted as the
    runtime's; both steps (with shape headers, then known shapes) add up; one stage never waits.
    The per-op trace (trace=True) has the op list's ops in order, each op's stamps in order, and
    its compute spans add up to compute_s."""
    pp, m, t = comm.Get_size(), 4, 0.04
    mesh = Mesh(pp=pp)
    stage = _Slow(t if mesh.pp_rank == 0 else 0.0)
    pipe = Pipeline(stage, mesh.pp_group, nn.MSE() if mesh.pp_is_last_stage else None, "1f1b", micro_batches=m,
                    trace=True)
    x = np.ones((8, 3))
    for _ in range(2):
        pipe.step(x if mesh.pp_is_first_stage else None, x if mesh.pp_is_last_stage else None)
        st = pipe.stats
        parts = st["compute_s"] + st["recompute_s"] + st["wait_s"] + st["runtime_s"]
        assert st["runtime_s"] >= 0 and parts == pytest.approx(st["t1"] - st["t0"], abs=1e-9), st
        trace = st["trace"]
        assert [op[:3] for op in trace] == pipe.ops, trace
        stamps = [s for op in trace for s in op[3:]]
        assert stamps == sorted(stamps) and st["t0"] <= stamps[0] and stamps[-1] <= st["t1"], trace
        assert sum(op[5] - op[4] for op in trace) == pytest.approx(st["compute_s"], abs=1e-9)
        if mesh.pp_rank == 0:
            assert st["wait_s"] < 0.5 * m * t and st["compute_s"] >= 0.9 * m * t, st
        else:
            assert st["wait_s"] >= 0.5 * m * t and st["runtime_s"] < st["wait_s"], st
