"""Sharded embeddings over AllToAll + data-parallel dense layers reproduce ONE process trained on
the global batch (DLRM, table-wise and row-wise), at every suite size (1, 2, 3, 4, 5, 8 ranks) -
with dense gradients, and with row-sparse gradients under every sparse optimizer (the one process
runs the same sparse optimizer). Initialisation draws only each rank's own rows."""
import tracemalloc

import numpy as np
import pytest

import disttrain as dt
from disttrain import nn, optim
from disttrain.comm.errors import CollectiveError
from disttrain.data.clicks import synthetic_clicks
from disttrain.nn.layout import shards
from disttrain.nn.sparse import RowSparseGrad
from disttrain.parallel import embedding
from disttrain.parallel.embedding import SHARDINGS, ShardedEmbeddings
from disttrain.parallel.embedding_init import BLOCK_ROWS
from disttrain.workloads import Batch, train_step
from disttrain_zoo.dlrm import DLRM

SIZES = (40, 23, 7, 3, 11)  # more tables than some suites' ranks, fewer than others; tiny ones too
STEPS = 4
SPARSE_OPTIMIZERS = {  # row-sparse gradients: each optimizer's lazy update (optim/rowwise.py)
    "sgd": lambda ps: optim.SGD(ps, lr=0.5),
    "sgd_momentum": lambda ps: optim.SGD(ps, lr=0.5, momentum=0.9, weight_decay=0.01),
    "lazy_adam": lambda ps: optim.Adam(ps, lr=0.05),
    "lazy_adamw": lambda ps: optim.AdamW(ps, lr=0.05, weight_decay=0.1),
    "rowwise_adagrad": lambda ps: optim.RowWiseAdagrad(ps, lr=0.2),
}


def model(sharding, group=None, sparse=False):
    return DLRM(SIZES, dim=4, dense=5, bottom=(8,), top=(8,), sharding=sharding, group=group, seed=3,
                dtype=np.float64, sparse=sparse)


def momentum_sgd(ps):
    return optim.SGD(ps, lr=0.5, momentum=0.9)


def shares(n, p):
    """Contiguous per-rank slices of a global batch of n (unequal when n % p != 0)."""
    bounds = np.linspace(0, n, p + 1).round().astype(int) if n % p else np.arange(p + 1) * (n // p)
    return [slice(bounds[r], bounds[r + 1]) for r in range(p)]


def train_one_process(data, batch_slices, make_opt=momentum_sgd, sparse=False):
    ref = model(None, sparse=sparse)
    loss_fn, opt = nn.BCEWithLogits(), make_opt(ref.parameters())
    losses = []
    for s in batch_slices:
        losses.append(loss_fn.forward(ref.forward((data.dense[s], data.ids[s])), data.clicks[s]))
        ref.backward(loss_fn.backward())
        opt.step()
        opt.zero_grad()
    return ref, losses, opt


def train_sharded(comm, sharding, global_batch, make_opt=momentum_sgd, sparse=False):
    """Train sharded on each rank's share and check every step's loss and the final model against
    the one process trained on the global batch; returns (sharded model, its optimizer, the one
    process's optimizer)."""
    p, r = comm.Get_size(), comm.Get_rank()
    # uneven: one rank gets more; "empty": the last rank gets no samples at all (p > 1)
    n = {"divisible": 8 * p, "uneven": 6 * p + (1 if p > 1 else 0), "empty": 5 * (p - 1) or 5}[global_batch]
    data = synthetic_clicks(n * STEPS, sizes=SIZES, dense=5, alpha=1.2, seed=5, dtype=np.float64)
    steps = [slice(i * n, (i + 1) * n) for i in range(STEPS)]
    ref, want, ref_opt = train_one_process(data, steps, make_opt, sparse)

    m = model(sharding, sparse=sparse)
    ddp = dt.DataParallel(m, bucket_mb=0.001)
    loss_fn, opt = nn.BCEWithLogits(), make_opt(m.parameters())
    for i, s in enumerate(steps):
        mine = shares(n, p)[r] if global_batch != "empty" else (shares(n, p - 1) + [slice(n, n)])[r] if p > 1 \
            else slice(0, n)
        idx = np.arange(s.start, s.stop)[mine]
        loss = train_step(ddp, loss_fn, Batch((data.dense[idx], data.ids[idx]), data.clicks[idx], len(idx), n), p)
        total = comm.allreduce(loss * len(idx))
        np.testing.assert_allclose(total / n, want[i], rtol=1e-10)
        opt.step()
        opt.zero_grad()

    for got_t, want_t in zip(m.embeddings.full_tables(), ref.embeddings.tables()):
        np.testing.assert_allclose(got_t, want_t.data, rtol=1e-10, atol=1e-13)
    dense = {q.name: q.data for q in ref.parameters() if not q.name.startswith("embeddings")}
    for q in m.parameters():
        if q.replicated:
            np.testing.assert_allclose(q.data, dense[q.name], rtol=1e-10, atol=1e-13)
    # every row lives on exactly one rank
    assert comm.allreduce(m.embeddings.shard.data.shape[0]) == sum(SIZES)
    return m, opt, ref_opt


@pytest.mark.mpi
@pytest.mark.parametrize("sharding", sorted(SHARDINGS))
@pytest.mark.parametrize("global_batch", ["divisible", "uneven", "empty"])
def test_dlrm_sharded_matches_one_process(comm, sharding, global_batch):
    train_sharded(comm, sharding, global_batch)


@pytest.mark.mpi
@pytest.mark.parametrize("sharding", sorted(SHARDINGS))
@pytest.mark.parametrize("opt", sorted(SPARSE_OPTIMIZERS))
def test_dlrm_sparse_updates_match_one_process_with_the_same_optimizer(comm, sharding, opt):
    m, o, ref_o = train_sharded(comm, sharding, "empty" if opt == "lazy_adam" else "uneven", SPARSE_OPTIMIZERS[opt],
                                True)
    assert isinstance(m.embeddings.shard.grad, RowSparseGrad)
    # lazy state ("momentum", "m", "v") is shard-shaped: through the shard's layout it is the one
    # process's state of every table (what resharding checkpoints save and load)
    shard = m.embeddings.shard
    for buf, state in o.state[shard.name].items():
        if state.shape != shard.data.shape:
            assert opt == "rowwise_adagrad"  # one value per row: not a layout-shaped buffer
            continue
        seen = 0
        for part in comm.allgather([(x.name, x.box, x.data.copy()) for x in shards(shard, state)]):
            for name, box, got in part:
                want = ref_o.state[name][buf][tuple(slice(a, b) for a, b in box)]
                np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
                seen += got.size
        assert seen == sum(SIZES) * 4  # every row of every table, once


@pytest.mark.mpi
@pytest.mark.parametrize("sharding", sorted(SHARDINGS))
def test_plain_sgd_is_bit_identical_sparse_or_dense(comm, sharding):
    dense = train_sharded(comm, sharding, "uneven", SPARSE_OPTIMIZERS["sgd"], False)[0].embeddings.shard.data
    sparse = train_sharded(comm, sharding, "uneven", SPARSE_OPTIMIZERS["sgd"], True)[0].embeddings.shard.data
    np.testing.assert_array_equal(sparse, dense)


@pytest.mark.mpi
@pytest.mark.parametrize("sharding", sorted(SHARDINGS))
def test_each_rank_draws_only_its_own_rows(comm, sharding, monkeypatch):
    """By construction (every row range drawn is one of this rank's blocks) and by measurement (the
    memory allocated while building is this rank's shard plus one block of temporaries)."""
    p = comm.Get_size()
    sizes, dim = (8 * BLOCK_ROWS + 3, BLOCK_ROWS + 1, 5), 4  # one table dominates: a rank holds part of it
    drawn, draw = [], embedding.table_rows
    monkeypatch.setattr(embedding, "table_rows", lambda seed, t, n, lo, hi, *a, **k: (
        drawn.append((t, lo, hi)), draw(seed, t, n, lo, hi, *a, **k))[1])
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        emb = ShardedEmbeddings(sizes, dim, sharding=sharding, seed=9, dtype=np.float64, sparse=True)
        extra = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    mine = sorted((t, lo, hi) for t, blocks in enumerate(emb.placement) for r, lo, hi, _ in blocks
                  if r == comm.Get_rank() and hi > lo)
    assert sorted(d for d in drawn if d[2] > d[1]) == mine
    assert extra <= emb.shard.data.nbytes + BLOCK_ROWS * dim * 8 + 64 * 1024, (extra, emb.shard.data.nbytes)
    if sharding == "row" and p > 1:  # no rank ever held a whole table
        assert extra < sizes[0] * dim * 8
    ref = embedding.LocalEmbeddings(sizes, dim, seed=9, dtype=np.float64)
    for got, want in zip(emb.full_tables(), ref.tables()):
        np.testing.assert_array_equal(got, want.data)


@pytest.mark.mpi
@pytest.mark.parametrize("sharding", sorted(SHARDINGS))
def test_lookup_with_empty_batch_and_dedup_stats(comm, sharding):
    """A rank with no samples still joins the AllToAlls; repeated ids are sent once per rank."""
    p, r = comm.Get_size(), comm.Get_rank()
    emb = ShardedEmbeddings([5, 9], 3, sharding=sharding, rng=np.random.default_rng(0), dtype=np.float64)
    tables = emb.full_tables()
    ids = np.zeros((0, 2), np.int64) if r == p - 1 and p > 1 else np.array([[1, 2], [1, 2], [4, 8], [1, 2]])
    out = emb.forward(ids)
    assert out.shape == (len(ids), 2, 3)
    for t in range(2):
        np.testing.assert_array_equal(out[:, t], tables[t][ids[:, t]])
    assert emb.stats.lookups == ids.size
    assert emb.stats.id_bytes == (0 if len(ids) == 0 else 4 * 8)  # 4 distinct rows, not 8
    emb.backward(np.ones_like(out))
    grads = comm.allgather(emb.shard.grad)  # total gradient mass = lookups / p (averaged over ranks)
    assert np.isclose(sum(g.sum() for g in grads), comm.allreduce(ids.size) * 3 / p)


@pytest.mark.mpi
def test_bad_ids_raise_on_every_rank(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    emb = ShardedEmbeddings([5, 9], 3, sharding="row")
    ids = np.array([[1, 2]])
    if r == p - 1:
        ids = np.array([[1, 9]])  # table 1 has rows 0..8
    with pytest.raises(CollectiveError, match=r"ids of table 1 must lie in \[0, 9\)"):
        emb.forward(ids)
    with pytest.raises(CollectiveError, match="shape"):
        emb.forward(np.zeros((2, 3), np.int64))  # three tables' ids for two tables, on every rank
    out = emb.forward(np.array([[1, 2]]))
    dy = np.ones_like(out) if r != p - 1 else np.ones((1, 2, 4))  # a wrong gradient on one rank only
    with pytest.raises(CollectiveError, match="gradient shape"):
        emb.backward(dy)


@pytest.mark.mpi
def test_ranks_disagreeing_about_tables_raise(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    if p == 1:
        pytest.skip("needs two ranks to disagree")
    with pytest.raises(CollectiveError, match="ShardedEmbeddings"):
        ShardedEmbeddings([5, 9 + (r == 1)], 3)
    with pytest.raises(CollectiveError, match="unknown sharding"):
        ShardedEmbeddings([5, 9], 3, sharding="column" if r == 0 else "row")
    with pytest.raises(CollectiveError, match="ShardedEmbeddings"):  # other rows: silently another model
        ShardedEmbeddings([5, 9], 3, seed=r)
    with pytest.raises(CollectiveError, match="ShardedEmbeddings"):  # sparse on some ranks only
        ShardedEmbeddings([5, 9], 3, sparse=r == 0)
    with pytest.raises(CollectiveError, match="non-negative integer, got -1"):  # a bad seed on one rank only
        ShardedEmbeddings([5, 9], 3, seed=-1 if r == p - 1 else 0)


@pytest.mark.mpi(min_size=2)
def test_full_tables_called_on_one_rank_only_raises_everywhere(comm):
    """attack9: full_tables is collective (an allgather of the shards) but was not checked: a rank
    that called it alone waited there for good, its peers in their next collective."""
    emb = ShardedEmbeddings([5, 9], 3, rng=np.random.default_rng(0), dtype=np.float64)
    with pytest.raises(CollectiveError, match="different collectives"):
        if comm.Get_rank() == comm.Get_size() - 1:
            emb.full_tables()
        emb.forward(np.array([[1, 2]]))
    assert [t.shape for t in emb.full_tables()] == [(5, 3), (9, 3)]  # still usable
