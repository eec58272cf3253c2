"""Tensor, pipeline and hybrid parallelism reproduce ONE process trained on the global batch."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import nn, optim
from disttrain.comm.errors import CollectiveError
from disttrain.parallel.mesh import Mesh
from disttrain.parallel.pipeline import Pipeline, bubble_fraction, partition
from disttrain.parallel.tensor import ColumnParallelLinear, ParallelAttention, ParallelMLP
from disttrain_zoo.transformer import Transformer

D, FFN, CLASSES, B, STEPS = 12, 120, 5, 16, 3  # FFN divides by 1..5 and 8


def batches(n_batches, batch, seed=9):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch, D)), rng.integers(0, CLASSES, batch)) for _ in range(n_batches)]


def sgd(params):
    return optim.SGD(params, lr=0.1, momentum=0.9)


def train_reference(model, data):
    loss_fn, opt = nn.SoftmaxCrossEntropy(), sgd(model.parameters())
    losses = []
    for x, y in data:
        losses.append(loss_fn.forward(model.forward(x), y))
        model.backward(loss_fn.backward())
        opt.step()
        opt.zero_grad()
    return losses


# ------------------------------------------------------------------------ tensor parallel
def tp_model(group, rng):
    return nn.Sequential(ParallelMLP(D, FFN, group, rng=rng, dtype=np.float64, input_grad=False),
                         nn.Linear(D, CLASSES, init="xavier", rng=rng, dtype=np.float64))


def dense_model(rng, input_grad=False):
    return nn.Sequential(nn.Linear(D, FFN, rng=rng, dtype=np.float64, input_grad=input_grad), nn.GELU(),
                         nn.Linear(FFN, D, init="xavier", rng=rng, dtype=np.float64),
                         nn.Linear(D, CLASSES, init="xavier", rng=rng, dtype=np.float64))


def assert_tp_matches(model, ref, t, tp):
    up, down = model.layers[0].up, model.layers[0].down
    r = ref.layers
    k = FFN // tp
    cols = slice(t * k, (t + 1) * k)
    np.testing.assert_allclose(up.weight.data, r[0].weight.data[:, cols], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(up.bias.data, r[0].bias.data[cols], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(down.weight.data, r[2].weight.data[cols], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(down.bias.data, r[2].bias.data, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(model.layers[1].weight.data, r[3].weight.data, rtol=1e-10, atol=1e-12)


@pytest.mark.mpi
def test_tensor_parallel_mlp_matches_one_process(comm):
    p = comm.Get_size()
    mesh = Mesh(tp=p)
    data = batches(STEPS, B)
    ref = dense_model(np.random.default_rng(4))
    want = train_reference(ref, data)
    model = tp_model(mesh.tp_group, np.random.default_rng(4))
    got = train_reference(model, data)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    assert_tp_matches(model, ref, mesh.tp_rank, p)


@pytest.mark.mpi
def test_hybrid_dp2_tp2_matches_one_process(comm):
    p = comm.Get_size()
    if p != 4:
        pytest.skip("dp2 x tp2 needs 4 ranks (run by the 4-rank suite)")
    mesh = Mesh(dp=2, tp=2)
    data = batches(STEPS, 2 * B)
    ref = dense_model(np.random.default_rng(4))
    train_reference(ref, data)
    model = tp_model(mesh.tp_group, np.random.default_rng(4))
    ddp = dt.DataParallel(model, group=mesh.dp_group, bucket_mb=0.001)
    loss_fn, opt = nn.SoftmaxCrossEntropy(), sgd(model.parameters())
    mine = slice(mesh.dp_rank * B, (mesh.dp_rank + 1) * B)
    for x, y in data:
        loss_fn.forward(ddp.forward(x[mine]), y[mine])
        ddp.backward(loss_fn.backward())
        opt.step()
        opt.zero_grad()
    assert_tp_matches(model, ref, mesh.tp_rank, 2)


@pytest.mark.mpi
def test_tensor_parallel_bad_sizes_raise_on_every_rank(comm):
    p = comm.Get_size()
    if p == 1:
        pytest.skip("every size divides by 1")
    with pytest.raises(CollectiveError, match="not divisible by the tensor-parallel size"):
        ColumnParallelLinear(4, 7 * p + 1, dt.world())


VOCAB, SEQ = 13, 6


def train_lm(model, data, ddp=None, rows=slice(None)):
    loss_fn, opt = nn.SoftmaxCrossEntropy(), sgd(model.parameters())
    run = ddp or model
    losses = []
    for ids, tgt in data:
        losses.append(loss_fn.forward(run.forward(ids[rows]), tgt[rows]))
        run.backward(loss_fn.backward())
        opt.step()
        opt.zero_grad()
    return losses


def lm_batches(batch, seed=5):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, VOCAB, (batch, SEQ)), rng.integers(0, VOCAB, (batch, SEQ))) for _ in range(STEPS)]


def assert_transformer_matches(model, ref, t, tp):
    """Replicated parameters equal; split ones equal their block of the one-process weights."""
    ref_p = {q.name: q.data for q in ref.parameters()}
    for blk, rblk in zip(model.layers[1:-1], ref.layers[1:-1]):
        d, h = blk.attn.d, blk.attn.heads
        qkv_cols = slice(t * 3 * d // tp, (t + 1) * 3 * d // tp)  # head-major: whole heads per rank
        rows = slice(t * d // tp, (t + 1) * d // tp)
        assert blk.attn.local_heads == h // tp
        np.testing.assert_allclose(blk.attn.qkv.weight.data, rblk.attn.qkv.weight.data[:, qkv_cols], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(blk.attn.proj.weight.data, rblk.attn.proj.weight.data[rows], rtol=1e-9, atol=1e-12)
        ffn = rblk.mlp.layers[0].weight.data.shape[1]
        cols = slice(t * ffn // tp, (t + 1) * ffn // tp)
        np.testing.assert_allclose(blk.mlp.up.weight.data, rblk.mlp.layers[0].weight.data[:, cols], rtol=1e-9, atol=1e-12)
    for q in model.parameters():
        if "attn.qkv" not in q.name and "attn.proj.weight" not in q.name and "mlp" not in q.name:
            np.testing.assert_allclose(q.data, ref_p[q.name], rtol=1e-9, atol=1e-12, err_msg=q.name)


def lm(group, heads, d):
    return Transformer(VOCAB, d=d, heads=heads, layers=2, ffn=2 * d, max_len=SEQ, group=group, seed=7,
                       dtype=np.float64)


@pytest.mark.mpi
@pytest.mark.parametrize("hybrid", [False, True])
def test_tensor_parallel_transformer_matches_one_process(comm, hybrid):
    """tp = world (heads split 2 per rank), and dp2 x tp2 at 4 ranks (DataParallel over dp groups)."""
    p = comm.Get_size()
    if hybrid and p != 4:
        pytest.skip("dp2 x tp2 needs 4 ranks (run by the 4-rank suite)")
    dp, tp = (2, 2) if hybrid else (1, p)
    mesh = Mesh(dp=dp, tp=tp)
    heads, d = 2 * tp, 4 * tp
    data = lm_batches(2 * dp)
    ref = lm(None, heads, d)
    want = train_lm(ref, data)
    model = lm(mesh.tp_group, heads, d)
    ddp = dt.DataParallel(model, group=mesh.dp_group, bucket_mb=0.001) if dp > 1 else None
    got = train_lm(model, data, ddp, slice(2 * mesh.dp_rank, 2 * mesh.dp_rank + 2))
    if dp == 1:
        np.testing.assert_allclose(got, want, rtol=1e-9)
    assert_transformer_matches(model, ref, mesh.tp_rank, tp)


@pytest.mark.mpi
def test_attention_heads_not_divisible_by_tp_raise_on_every_rank(comm):
    p = comm.Get_size()
    if p == 1:
        pytest.skip("every head count divides by 1")
    with pytest.raises(CollectiveError, match=r"heads [34] is not divisible by the tensor-parallel size"):
        ParallelAttention(6 * p, 3 if p != 3 else 4, dt.world())


# ------------------------------------------------------------------------------ pipeline
def layers(rng):
    """Five blocks (Linear + activation) and the head: up to 6 stages, each with parameters."""
    acts = [nn.ReLU, nn.Tanh, nn.GELU, nn.ReLU, nn.Tanh]
    sizes = [D, 24, 24, 16, 16, 20]
    out = [nn.Sequential(nn.Linear(a, b, rng=rng, dtype=np.float64, input_grad=i > 0), act())
           for i, (a, b, act) in enumerate(zip(sizes[:-1], sizes[1:], acts))]
    return out + [nn.Linear(sizes[-1], CLASSES, init="xavier", rng=rng, dtype=np.float64)]


def pipeline_shape(p):
    """(dp, pp) for the suite's world size: pure pipelines up to 5 ranks, dp2 x pp4 at 8."""
    return (2, p // 2) if p > 5 else (1, p)


def n_params(layer):
    return sum(q.data.size for q in layer.parameters()) + 1


@pytest.mark.mpi
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("m", [1, 4, 8])
@pytest.mark.parametrize("hybrid", [False, True])
def test_pipeline_matches_one_process(comm, schedule, m, hybrid):
    """Pure pipelines over all ranks (dp2 x pp4 at 8), and hybrid dp2 x pp2 at 4 ranks."""
    if hybrid and comm.Get_size() != 4:
        pytest.skip("dp2 x pp2 needs 4 ranks (run by the 4-rank suite)")
    dp, pp = (2, 2) if hybrid else pipeline_shape(comm.Get_size())
    mesh = Mesh(dp=dp, pp=pp)
    data = batches(STEPS, dp * B)
    ref_layers = layers(np.random.default_rng(2))
    want = train_reference(nn.Sequential(*ref_layers), data)
    all_layers = layers(np.random.default_rng(2))
    nn.Sequential(*all_layers).parameters()  # global names ("layers.4.weight") that every stage keeps
    bounds = partition([n_params(x) for x in all_layers], pp)
    a, b = bounds[mesh.pp_rank]
    stage = nn.Sequential(*all_layers[a:b])
    mod = dt.DataParallel(stage, group=mesh.dp_group, bucket_mb=0.001) if dp > 1 else stage
    pipe = Pipeline(mod, mesh.pp_group, nn.SoftmaxCrossEntropy() if mesh.pp_is_last_stage else None,
                    schedule=schedule, micro_batches=m)
    opt = sgd(stage.parameters())
    mine = slice(mesh.dp_rank * B, (mesh.dp_rank + 1) * B)
    got = []
    for x, y in data:
        got.append(pipe.step(x[mine] if mesh.pp_is_first_stage else None, y[mine] if mesh.pp_is_last_stage else None))
        opt.step()
        opt.zero_grad()
    if dp == 1:
        np.testing.assert_allclose(got, want, rtol=1e-10)
    for q, w in zip(stage.parameters(), [q for x in ref_layers[a:b] for q in x.parameters()]):
        np.testing.assert_allclose(q.data, w.data, rtol=1e-10, atol=1e-12)
    # the runtime's own activation accounting: GPipe keeps all m alive, 1F1B at most pp - stage
    want_live = m if schedule == "gpipe" else min(m, pp - mesh.pp_rank)
    assert pipe.stats["peak_live"] == want_live, pipe.stats
    assert pipe.stats["peak_activation_bytes"] > 0


@pytest.mark.mpi
def test_pipeline_errors_on_every_rank(comm):
    p = comm.Get_size()
    mesh = Mesh(pp=p)
    stage = nn.Sequential(nn.Linear(D, D, dtype=np.float64))
    pipe = Pipeline(stage, mesh.pp_group, nn.MSE() if mesh.pp_is_last_stage else None, micro_batches=4)
    x, y = np.zeros((10, D)), np.zeros((10, D))
    with pytest.raises(CollectiveError, match="divide into 4 micro-batches"):
        pipe.step(x if mesh.pp_is_first_stage else None, y if mesh.pp_is_last_stage else None)
    with pytest.raises(CollectiveError, match="unknown pipeline schedule"):
        Pipeline(stage, mesh.pp_group, nn.MSE(), schedule="zigzag")
    with pytest.raises(CollectiveError, match=f"but the job has {p}"):
        Mesh(dp=p + 1)
    with pytest.raises(ValueError, match="cannot fill"):
        partition([1.0] * 3, 4)


def test_partition_balances_measured_cost_not_layer_count():
    assert partition([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert partition([8, 1, 1, 1, 1, 1, 1, 1, 1], 2) == [(0, 1), (1, 9)]  # by count: (0,5) = 12 vs 4
    assert partition([5], 1) == [(0, 1)]
    assert bubble_fraction(4, 12) == pytest.approx(3 / 15)
