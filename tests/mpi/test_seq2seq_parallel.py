"""GNMT-lite trained data-parallel on variable-length batches reproduces one process on the global
batch: each rank's gradient is weighted by its share of the step's real target tokens, and a rank
with an empty batch still joins the averaging (workloads.train_step)."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import nn, optim
from disttrain.data import text
from disttrain.job import TrainConfig
from disttrain.workloads import MODEL_DEFAULTS, Batch, Seq2SeqTranslation, train_step
from disttrain_zoo.gnmt import GNMT

# 1, 2, 3, 5 only (tests/test_mpi_suites.py): the sentences are split by rank count only; 3 and
# 5 give the non-divisible, unequal token counts that 4 and 8 repeat (no layout only they reach).
MPI_RANKS = (1, 2, 3, 5)


def corpus(n, vocab=20, seed=3):
    """n random sentences of 2-12 tokens, reversed as targets (the task of data/text.py)."""
    rng = np.random.default_rng(seed)
    src = [rng.integers(4, vocab, rng.integers(2, 13)) for _ in range(n)]
    tgt = [np.concatenate([s[::-1], [text.EOS]]) for s in src]
    return text.Seq2Seq(src, tgt, text.SPECIALS + [f"w{i}" for i in range(4, vocab)])


def config(batching):
    return TrainConfig(**{**MODEL_DEFAULTS["gnmt"], "model": "gnmt", "hidden": "5,6,2", "dtype": "float64",
                          "max_tokens": 40, "batching": batching, "seed": 7})


@pytest.mark.mpi
@pytest.mark.parametrize("batching", ["naive", "bucketed", "load_balanced"])
def test_gnmt_data_parallel_matches_one_process_on_the_global_batch(comm, batching):
    p, r = comm.Get_size(), comm.Get_rank()
    data = corpus(13 * p + 5)  # not divisible by anything convenient
    work = Seq2SeqTranslation(config(batching), r, p, corpus=data)
    steps = len(work.batcher.plan(0)) + 2  # the whole first epoch (ragged end) and into the second
    ddp = dt.DataParallel(work.model, bucket_mb=0.002)  # several buckets, overlapping backward
    assert len(ddp.buckets) > 2
    opt = optim.SGD(work.model.parameters(), lr=0.5, momentum=0.9)

    ref = GNMT(len(data.vocab), emb=5, hidden=6, layers=2, seed=7, dtype=np.float64)
    ref_opt, loss_fn = optim.SGD(ref.parameters(), lr=0.5, momentum=0.9), nn.SoftmaxCrossEntropy(ignore_index=0)
    uneven = 0
    for step in range(steps):
        batch = work.batch(step)
        plan, s, _ = work._locate(step)
        everyone = np.concatenate(plan.steps[s])  # the global batch, trained in one process
        src, s_len, tgt_in, tgt_out = work.train.batch(everyone)
        loss_fn.forward(ref.forward((src, s_len, tgt_in)), tgt_out)
        ref.backward(loss_fn.backward())
        counts = comm.allgather(batch.count)
        assert sum(counts) == batch.global_count == int((tgt_out != 0).sum())
        uneven += len(set(counts)) > 1
        train_step(ddp, work.loss_fn, batch, p)
        for q, w in zip(work.model.parameters(), ref.parameters()):
            np.testing.assert_allclose(q.grad, w.grad, rtol=1e-9, atol=1e-12, err_msg=f"step {step} {q.name}")
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
    for q, w in zip(work.model.parameters(), ref.parameters()):
        np.testing.assert_allclose(q.data, w.data, rtol=1e-9, atol=1e-12, err_msg=q.name)
    assert uneven or p == 1, "the test must exercise unequal per-rank token counts"


@pytest.mark.mpi
def test_rank_with_an_empty_batch_joins_the_average(comm):
    """Rank 0 has no sentences this step (what a ragged epoch end gives naive sharding): it calls
    DataParallel.synchronize() with zero gradients, the others weight theirs; the average is still
    the global-batch gradient, and nobody waits forever."""
    p, r = comm.Get_size(), comm.Get_rank()
    data = corpus(3 * p + 2)
    work = Seq2SeqTranslation(config("naive"), r, p, corpus=data)
    ddp = dt.DataParallel(work.model, bucket_mb=0.002)
    ref = GNMT(len(data.vocab), emb=5, hidden=6, layers=2, seed=7, dtype=np.float64)
    loss_fn = nn.SoftmaxCrossEntropy(ignore_index=0)
    shares = np.array_split(np.arange(len(work.train)), max(p - 1, 1))
    mine = shares[r - 1] if r > 0 else (shares[0] if p == 1 else np.zeros(0, np.int64))
    src, s_len, tgt_in, tgt_out = work.train.batch(np.arange(len(work.train)))
    loss_fn.forward(ref.forward((src, s_len, tgt_in)), tgt_out)
    ref.backward(loss_fn.backward())
    s_, l_, ti, to = work.train.batch(mine)
    batch = Batch((s_, l_, ti), to, int((to != 0).sum()), int((tgt_out != 0).sum()))
    assert (batch.count == 0) == (r == 0 and p > 1)
    train_step(ddp, work.loss_fn, batch, p)
    for q, w in zip(work.model.parameters(), ref.parameters()):
        np.testing.assert_allclose(q.grad, w.grad, rtol=1e-9, atol=1e-12, err_msg=q.name)
