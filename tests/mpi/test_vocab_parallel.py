"""Vocabulary-parallel output layer and cross-entropy (Megatron's parallel softmax) against the
whole-vocabulary layer and loss in one process; GNMT-lite and the transformer with it, inside
pipelines, trained against one process on the global batch (float64)."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import nn
from disttrain.parallel.mesh import Mesh
from disttrain.parallel.pipeline import Pipeline
from disttrain.parallel.vocab import VocabParallelCrossEntropy, VocabParallelLinear
from disttrain_zoo.gnmt import GNMT
from disttrain_zoo.transformer import Transformer

from .test_pipeline_models import RTOL, assert_regions_match, cut, sentences, sgd, step, train_reference

VOCAB = 120  # divides by 1..6 and 8


@pytest.mark.mpi
@pytest.mark.parametrize("rows", [0, 1, 23])
def test_parallel_softmax_equals_the_whole_vocabulary(comm, rows):
    """Loss, logits' gradient, input and weight gradients at tp = world; padding targets ignored,
    targets owned by every rank, rows 0 and 1 included; evaluation mode gathers all logits."""
    mesh = Mesh(tp=comm.Get_size())
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 3, 7))
    t = rng.integers(0, VOCAB, (rows, 3))
    t[::2, 0] = 0  # padding
    ref, loss = nn.Linear(7, VOCAB, init="xavier", rng=np.random.default_rng(1), dtype=np.float64), \
        nn.SoftmaxCrossEntropy(ignore_index=0)
    par = VocabParallelLinear(7, VOCAB, mesh.tp_group, init="xavier", rng=np.random.default_rng(1), dtype=np.float64)
    ploss = VocabParallelCrossEntropy(mesh.tp_group, ignore_index=0)
    want = loss.forward(ref.forward(x), t)
    dx_want = ref.backward(loss.backward())
    got = ploss.forward(par.forward(x), t)
    dx = par.backward(ploss.backward())
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    np.testing.assert_allclose(dx, dx_want, rtol=1e-10, atol=1e-13)
    k = VOCAB // mesh.tp
    np.testing.assert_allclose(par.weight.grad, ref.weight.grad[:, mesh.tp_rank * k:(mesh.tp_rank + 1) * k],
                               rtol=1e-10, atol=1e-13)
    par.eval()
    np.testing.assert_allclose(par.forward(x), ref.forward(x), rtol=1e-12)


@pytest.mark.mpi
def test_bad_targets_raise_on_every_rank(comm):
    mesh = Mesh(tp=comm.Get_size())
    ploss = VocabParallelCrossEntropy(mesh.tp_group)
    logits = np.zeros((4, VOCAB // mesh.tp))
    with pytest.raises(dt.CollectiveError, match=f"targets must lie in \\[0, {VOCAB}\\)"):
        ploss.forward(logits, np.array([0, 1, VOCAB, 2]) if mesh.tp_rank == mesh.tp - 1 else np.arange(4))


# (pp, tp) by world size
MESHES = {1: (1, 1), 2: (1, 2), 3: (1, 3), 4: (2, 2), 5: (1, 5), 8: (2, 4)}


@pytest.mark.mpi
def test_gnmt_and_transformer_with_vocabulary_parallel_output_in_a_pipeline(comm):
    """pp x tp = world (pp2 x tp2 at 4, pp2 x tp4 at 8): GNMT (uneven micro-batches weighted by
    tokens) and the transformer LM (tp heads and MLPs too) reproduce one process."""
    pp, tp = MESHES[comm.Get_size()]
    mesh = Mesh(pp=pp, tp=tp)
    loss = VocabParallelCrossEntropy(mesh.tp_group, ignore_index=0) if mesh.pp_is_last_stage else None
    # GNMT
    data = [sentences(9, s) for s in (1, 2)]
    ref, want = train_reference(GNMT(VOCAB, emb=4, hidden=5, layers=2, seed=7, dtype=np.float64),
                                nn.SoftmaxCrossEntropy(ignore_index=0), data)
    stage, _ = cut(GNMT(VOCAB, emb=4, hidden=5, layers=2, seed=7, dtype=np.float64, tp_group=mesh.tp_group), mesh)
    pipe, opt = Pipeline(stage, mesh.pp_group, loss, "1f1b", 2, uneven=True), sgd(stage.parameters())
    got = []
    for x, y in data:
        got.append(pipe.step(x if mesh.pp_is_first_stage else None, y if mesh.pp_is_last_stage else None))
        step(opt)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    assert_regions_match(stage.parameters(), ref)
    # the transformer: ids (B, S), next-token targets
    rng = np.random.default_rng(5)
    data = [(rng.integers(0, VOCAB, (6, 5)), rng.integers(0, VOCAB, (6, 5))) for _ in range(2)]
    heads = tp if tp in (3, 5) else 4  # heads divide over tp
    kw = dict(d=2 * heads, heads=heads, layers=2, ffn=120, max_len=5, seed=2, dtype=np.float64)
    ref, want = train_reference(Transformer(VOCAB, **kw), nn.SoftmaxCrossEntropy(), data)
    stage, _ = cut(Transformer(VOCAB, group=mesh.tp_group if tp > 1 else None, vocab_parallel=True, **kw), mesh)
    loss = VocabParallelCrossEntropy(mesh.tp_group) if mesh.pp_is_last_stage else None
    pipe, opt = Pipeline(stage, mesh.pp_group, loss, "zb1", 3), sgd(stage.parameters())
    got = []
    for x, y in data:
        got.append(pipe.step(x if mesh.pp_is_first_stage else None, y if mesh.pp_is_last_stage else None))
        step(opt)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    # tensor-parallel attention / MLP blocks have other names than the dense ones (tested in
    # test_model_parallel.py); the embeddings, LayerNorms and the vocabulary-parallel output match
    assert_regions_match([q for q in stage.parameters() if ".attn." not in q.name and ".mlp." not in q.name], ref)
