"""Sharded embeddings over AllToAll + data-parallel dense layers reproduce ONE process trained on
the global batch (DLRM, table-wise and row-wise), at every suite size (1, 2, 3, 4, 5, 8 ranks)."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import nn, optim
from disttrain.comm.errors import CollectiveError
from disttrain.data.clicks import synthetic_clicks
from disttrain.parallel.embedding import SHARDINGS, ShardedEmbeddings
from disttrain.workloads import Batch, train_step
from disttrain_zoo.dlrm import DLRM

SIZES = (40, 23, 7, 3, 11)  # more tables than some suites' ranks, fewer than others; tiny ones too
STEPS = 4


def model(sharding, group=None):
    return DLRM(SIZES, dim=4, dense=5, bottom=(8,), top=(8,), sharding=sharding, group=group, seed=3,
                dtype=np.float64)


def shares(n, p):
    """Contiguous per-rank slices of a global batch of n (unequal when n % p != 0)."""
    bounds = np.linspace(0, n, p + 1).round().astype(int) if n % p else np.arange(p + 1) * (n // p)
    return [slice(bounds[r], bounds[r + 1]) for r in range(p)]


def train_one_process(data, batch_slices):
    ref = model(None)
    loss_fn, opt = nn.BCEWithLogits(), optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for s in batch_slices:
        losses.append(loss_fn.forward(ref.forward((data.dense[s], data.ids[s])), data.clicks[s]))
        ref.backward(loss_fn.backward())
        opt.step()
        opt.zero_grad()
    return ref, losses


@pytest.mark.mpi
@pytest.mark.parametrize("sharding", sorted(SHARDINGS))
@pytest.mark.parametrize("global_batch", ["divisible", "uneven", "empty"])
def test_dlrm_sharded_matches_one_process(comm, sharding, global_batch):
    p, r = comm.Get_size(), comm.Get_rank()
    # uneven: one rank gets more; "empty": the last rank gets no samples at all (p > 1)
    n = {"divisible": 8 * p, "uneven": 6 * p + (1 if p > 1 else 0), "empty": 5 * (p - 1) or 5}[global_batch]
    data = synthetic_clicks(n * STEPS, sizes=SIZES, dense=5, alpha=1.2, seed=5, dtype=np.float64)
    steps = [slice(i * n, (i + 1) * n) for i in range(STEPS)]
    ref, want = train_one_process(data, steps)

    m = model(sharding)
    ddp = dt.DataParallel(m, bucket_mb=0.001)
    loss_fn, opt = nn.BCEWithLogits(), optim.SGD(m.parameters(), lr=0.5, momentum=0.9)
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
