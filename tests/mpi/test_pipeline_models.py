"""GNMT-lite and DLRM through the mesh: cut into pipeline stages that pass tuples of arrays
(encoder states, lengths, embedding vectors: parallel/pipeline/activations.py), with data- and
tensor-parallel ranks around them, reproduce ONE process trained on the global batch (float64)."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import nn, optim
from disttrain.nn import layout
from disttrain.parallel.mesh import Mesh
from disttrain.parallel.pipeline import Pipeline, assign
from disttrain.parallel.pipeline.schedules import problem
from disttrain_zoo.dlrm import DLRM
from disttrain_zoo.gnmt import GNMT

V, STEPS, RTOL = 13, 3, 1e-9


def sgd(params):
    return optim.SGD(params, lr=0.3, momentum=0.9)


def step(opt):
    opt.step()
    opt.zero_grad()


def assert_regions_match(params, ref):
    """Every region of a global array this rank holds (pipeline stage, tp columns/rows, embedding
    rows: nn.layout) equals the one-process model's."""
    want = {q.name: q.data for q in ref.parameters()}
    for p in params:
        for sh in layout.shards(p):
            w = want[sh.name][tuple(slice(a, b) for a, b in sh.box)]
            if sh.flat is not None:
                w = w.reshape(-1)[sh.flat[0]:sh.flat[1]]
            np.testing.assert_allclose(sh.data, w, rtol=RTOL, atol=1e-12, err_msg=sh.name)


def cut(model, mesh, v=1):
    """This rank's stage of the model's blocks (equal costs), DataParallel-wrapped when dp > 1."""
    model.parameters()  # global names before the cut
    units = model.blocks()
    chunks = [nn.Sequential(*units[a:b]) for a, b in assign([1.0] * len(units), mesh.pp, v)[mesh.pp_rank]]
    stage = chunks[0] if v == 1 else nn.Sequential(*chunks)
    return stage, (dt.DataParallel(stage, group=mesh.dp_group, bucket_mb=0.001) if mesh.dp > 1 else stage)


# --------------------------------------------------------------------------------------- GNMT
def sentences(n, seed):
    """A padded seq2seq batch with lengths 1..7: (src, src_len, tgt_in), tgt_out (PAD = 0)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 8, n)
    src, tgt_in, tgt_out = (np.zeros((n, 8), np.int64) for _ in range(3))
    for i, k in enumerate(lens):
        s = rng.integers(4, V, k)
        src[i, :k], tgt_out[i, :k + 1] = s, np.append(s[::-1], 2)
        tgt_in[i, :k + 1] = np.append(1, s[::-1])
    return (src, lens, tgt_in), tgt_out


def gnmt():
    return GNMT(V, emb=4, hidden=5, layers=2, seed=7, dtype=np.float64)


def train_reference(ref, loss_fn, data):
    """The one-process oracle: the model trained on each global batch; (model, losses)."""
    opt, losses = sgd(ref.parameters()), []
    for x, y in data:
        losses.append(loss_fn.forward(ref.forward(x), y))
        ref.backward(loss_fn.backward())
        opt.step()
        opt.zero_grad()
    return ref, losses


def shares(n, dp, r):
    return np.array_split(np.arange(n), dp)[r]


# tuples of arrays and None parts between stages: through the shared-memory channel (the
# default), and one case through MPI's known-shape path
GNMT_CASES = [("1f1b", 1, "none", "shm"), ("zb1", 1, "full", "shm"), ("interleaved", 2, "selective", "shm"),
              ("gpipe", 1, "none", "mpi"), ("zb2", 1, "selective", "shm")]


@pytest.mark.mpi
@pytest.mark.parametrize("schedule,v,recompute,transport", GNMT_CASES)
def test_gnmt_pipeline_matches_one_process(comm, schedule, v, recompute, transport):
    """pp = world (dp2 x pp2 at 4, dp2 x pp4 at 8): 7 units, replicas with 10 and 9 sentences cut
    into 3 or p uneven micro-batches whose token counts differ; the loss is the token mean of the
    global batch. Steps 1-2 have the same shapes (known-shape messages), step 3 others."""
    p = comm.Get_size()
    dp = 2 if p in (4, 8) else 1
    pp = p // dp
    m = pp if schedule == "interleaved" else 3
    if len(gnmt().blocks()) < pp * v or problem(schedule, pp, m, v):
        pytest.skip(f"{pp * v} chunks of 7 units, or {problem(schedule, pp, m, v)}")
    mesh = Mesh(dp=dp, pp=pp)
    n = 19 if dp > 1 else 10
    data = [sentences(n, 1), sentences(n, 2), sentences(n - 3, 3)]
    data[2] = ((data[2][0][0][:, :6], data[2][0][1].clip(max=5), data[2][0][2][:, :6]), data[2][1][:, :6])
    ref, want = train_reference(gnmt(), nn.SoftmaxCrossEntropy(ignore_index=0), data)
    stage, mod = cut(gnmt(), mesh, v)
    pipe = Pipeline(mod, mesh.pp_group, nn.SoftmaxCrossEntropy(ignore_index=0) if mesh.pp_is_last_stage else None,
                    schedule, m, virtual_stages=v, recompute=recompute, uneven=True, transport=transport)
    opt, got, known = sgd(stage.parameters()), [], []
    for x, y in data:
        rows = shares(len(y), dp, mesh.dp_rank)
        count, total = int((y[rows] != 0).sum()), int((y != 0).sum())
        xs = tuple(a[rows] for a in x)
        got.append(pipe.step(xs if mesh.pp_is_first_stage else None, y[rows] if mesh.pp_is_last_stage else None,
                             weight=count * dp / total))
        known.append(pipe.net.known)
        step(opt)
    if dp == 1:
        np.testing.assert_allclose(got, want, rtol=RTOL)
    assert known == [False, True, False]
    assert_regions_match(stage.parameters(), ref)


@pytest.mark.mpi
def test_gnmt_pipeline_predict_and_bad_batches(comm):
    """Evaluation through the stages equals the one-process forward; fewer sentences than
    micro-batches give the one-process loss (uneven); a non-dividing batch without uneven raises on
    every rank (no hang)."""
    p = comm.Get_size()
    dp = 2 if p == 8 else 1  # 7 units: at most 7 stages
    mesh = Mesh(dp=dp, pp=p // dp)
    _, mod = cut(gnmt(), mesh)  # DataParallel-wrapped at dp 2: its replicas average the gradients
    loss = nn.SoftmaxCrossEntropy(ignore_index=0) if mesh.pp_is_last_stage else None
    pipe = Pipeline(mod, mesh.pp_group, loss, "1f1b", 4, uneven=True)
    x, y = sentences(6, 4)
    np.testing.assert_allclose(pipe.predict(x if mesh.pp_is_first_stage else None), gnmt().forward(x), rtol=1e-12)
    first, last = mesh.pp_is_first_stage, mesh.pp_is_last_stage
    few = tuple(a[:3] for a in x)  # fewer sentences than micro-batches: the 4th is empty and skipped
    want = nn.SoftmaxCrossEntropy(ignore_index=0).forward(gnmt().forward(few), y[:3])
    np.testing.assert_allclose(pipe.step(few if first else None, y[:3] if last else None), want, rtol=RTOL)
    strict = Pipeline(mod, mesh.pp_group, loss, "1f1b", 4)
    with pytest.raises(dt.CollectiveError, match="6 samples must divide into 4 micro-batches"):
        strict.step(x if first else None, y if last else None)


# --------------------------------------------------------------------------------------- DLRM
SIZES = [30, 11, 5]


def clicks(n, seed):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.integers(0, s, n) for s in SIZES], axis=1)
    return (rng.standard_normal((n, 8)), ids), rng.integers(0, 2, (n, 1)).astype(np.float64)


def dlrm(mesh=None, sharding=None):
    return DLRM(SIZES, dim=4, bottom=(10,), top=(10,), seed=3, dtype=np.float64, sharding=sharding,
                group=mesh.dp_group if mesh else None, tp_group=mesh.tp_group if mesh else None)


# (dp, pp, tp) by world size: every layout that fits, tp pairs in the MLPs
DLRM_MESHES = {1: [(1, 1, 1)], 2: [(1, 2, 1)], 3: [(1, 3, 1)], 4: [(1, 2, 2), (2, 2, 1), (1, 4, 1)],
               5: [(1, 1, 5)], 8: [(2, 2, 2)]}


@pytest.mark.mpi
@pytest.mark.parametrize("schedule", ["1f1b", "zb1"])
def test_dlrm_mesh_matches_one_process(comm, schedule):
    """DLRM (4 units: lookup + bottom block, bottom block carrying the embedding vectors,
    interaction + top block, top block) over dp x pp x tp (tp 5 at 5 ranks: 10 MLP columns); with dp > 1 the tables are row-sharded over the dp group
    (AllToAll lookups per micro-batch on the first stage)."""
    data = [clicks(24, s) for s in range(STEPS)]
    ref, want = train_reference(dlrm(), nn.BCEWithLogits(), data)
    for dp, pp, tp in DLRM_MESHES[comm.Get_size()]:
        mesh = Mesh(dp=dp, pp=pp, tp=tp)
        stage, mod = cut(dlrm(mesh, "row" if dp > 1 else None), mesh)
        pipe = Pipeline(mod, mesh.pp_group, nn.BCEWithLogits() if mesh.pp_is_last_stage else None, schedule, 4)
        opt, got = sgd(stage.parameters()), []
        for x, y in data:
            rows = shares(len(y), dp, mesh.dp_rank)
            got.append(pipe.step(tuple(a[rows] for a in x) if mesh.pp_is_first_stage else None,
                                 y[rows] if mesh.pp_is_last_stage else None))
            step(opt)
        if dp == 1:
            np.testing.assert_allclose(got, want, rtol=RTOL, err_msg=f"dp{dp} pp{pp} tp{tp}")
        assert_regions_match(stage.parameters(), ref)
        mesh.free()


@pytest.mark.mpi
def test_predict_on_one_stage_while_the_others_train_raises_everywhere(comm):
    """attack9 (05): an evaluation guarded by a rank-dependent condition - one stage predicts, the
    others step - is a CollectiveError on every stage (it hung in the pipeline's receives)."""
    p = comm.Get_size()
    if p < 2 or p > 7:
        pytest.skip("two to seven stages")
    mesh = Mesh(dp=1, pp=p)
    stage, _ = cut(gnmt(), mesh)
    first, last = mesh.pp_is_first_stage, mesh.pp_is_last_stage
    loss = nn.SoftmaxCrossEntropy(ignore_index=0) if last else None
    pipe = Pipeline(stage, mesh.pp_group, loss, "1f1b", 2, uneven=True)
    x, y = sentences(4, 5)
    with pytest.raises(dt.CollectiveError, match="Pipeline"):
        if mesh.pp_rank == p - 1:
            pipe.predict(None)
        else:
            pipe.step(x if first else None, y if last else None)
    out = pipe.predict(x if first else None)  # the pipeline is usable afterwards
    np.testing.assert_allclose(out, gnmt().forward(x), rtol=1e-12)
