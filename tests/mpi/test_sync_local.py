"""--sync local:H and hybrid:G (parallel/sync/local.py, hybrid.py, exchange.py) against ONE
process (float64): local:1 with SGD is synchronous data parallelism on the global batch; local:H,
hybrid:G (uneven groups too) and the DiLoCo outer step against a one-process simulation of the
same replicas. Uneven shares (batches the ranks do not divide, empty shares) throughout."""
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

import disttrain as dt
from disttrain import nn, optim
from disttrain.data import DistributedSampler
from disttrain.job.config import TrainConfig
from disttrain.parallel.sync import make, problems
from disttrain.parallel.sync.local import consecutive_groups
from disttrain.workloads import Batch, train_step
from disttrain_zoo.mlp import MLP

# 1, 2, 3, 5 only (tests/test_mpi_suites.py): local SGD and hybrid groups partition the ranks
# consecutively; 3 and 5 reach the uneven groups (G = 2: 2 + 1, 3 + 2) and the empty shares (B = 1)
# that 4 and 8 repeat - no layout here exists only at 4 or 8 (measured: 1.5 s at 8 ranks).
MPI_RANKS = (1, 2, 3, 5)

SIZES, N, LR = [6, 16, 3], 40, 0.2


def data():
    rng = np.random.default_rng(7)
    return rng.standard_normal((N, SIZES[0])), rng.integers(0, SIZES[-1], N)


def config(sync, **kw):
    return dataclasses.replace(TrainConfig(), sync=sync, dtype="float64", **kw)


def train(sync, B, steps, momentum=0.0, nan_at=None, **kw):
    """The parameters after `steps` steps of --sync `sync` on this job's ranks, and the verdicts."""
    comm = dt.world().comm
    p, r = comm.Get_size(), comm.Get_rank()
    x, y = data()
    cfg = config(sync, steps=steps, **kw)
    mesh = dt.Mesh(p)
    mode = make(sync, cfg)
    group = mode.dp_group(mesh)
    model, loss = MLP(SIZES, dtype=np.float64), nn.SoftmaxCrossEntropy()
    ddp = dt.DataParallel(model, bucket_mb=0.001, group=group)
    opt = optim.SGD(model.parameters(), lr=LR, momentum=momentum)
    run = SimpleNamespace(model=model, ddp=ddp, opt=opt, cfg=cfg)
    mode.start(run)
    sampler = DistributedSampler(N, B, r, p, seed=1, uneven=True)
    verdicts = []
    for s in range(steps):
        idx = sampler.indices(s)
        train_step(ddp, loss, Batch(x[idx], y[idx], len(idx), B), p)
        if (r, s) in ({nan_at} if isinstance(nan_at, tuple) else set(nan_at or ())):  # (rank, step) or a set
            model.parameters()[0].grad[0, 0] = np.nan
        verdicts.append(mode.update(run, s))
    mode.finish(run)
    rec = mode.record()
    out = [q.data.copy() for q in model.parameters()]
    group.free()
    mesh.free()
    return out, verdicts, rec


def simulate(groups, period, B, steps, momentum=0.0, avg_state=False, outer=(1.0, 0.0), p=None, skip=None):
    """ONE process: a replica per group, each stepping on its members' shares (each member's mean
    gradient weighted by its share, as train_step does, averaged over the group as DataParallel
    does), all replicas averaged (weighted by group size) every `period` steps and at the end.
    skip: (replica, step) pairs in which that replica skips the step (a non-finite gradient); a replica without
    a momentum buffer yet averages in zeros (what the optimizer would create it as)."""
    x, y = data()
    p = sum(len(g) for g in groups)
    models = [MLP(SIZES, dtype=np.float64) for _ in groups]
    opts = [optim.SGD(m.parameters(), lr=LR, momentum=momentum) for m in models]
    loss = nn.SoftmaxCrossEntropy()
    w = np.array([len(g) / p for g in groups])
    anchor = [q.data.copy() for q in models[0].parameters()]
    vel = [np.zeros_like(a) for a in anchor]

    def average():
        for j, qs in enumerate(zip(*[m.parameters() for m in models])):
            avg = sum(wi * q.data for wi, q in zip(w, qs))
            if outer != (1.0, 0.0):
                g = anchor[j] - avg
                vel[j] = outer[1] * vel[j] + g
                anchor[j] = anchor[j] - outer[0] * (g + outer[1] * vel[j])
                avg = anchor[j]
            for q in qs:
                q.data[...] = avg
        if avg_state and momentum:
            for name in {n for o in opts for n in o.state}:
                avg = sum(wi * o.state.get(name, {}).get("momentum", 0.0) for wi, o in zip(w, opts))
                for o in opts:
                    o.state.setdefault(name, {})["momentum"] = avg.copy()

    for s in range(steps):
        for g, m, o in zip(groups, models, opts):
            for r in g:
                idx = DistributedSampler(N, B, r, p, seed=1, uneven=True).indices(s)
                if len(idx):
                    loss.forward(m.forward(x[idx]), y[idx])
                    m.backward(loss.backward() * (len(idx) * p / B / len(g)))
            if (groups.index(g), s) not in (skip or ()):
                o.step()
            o.zero_grad()
        if (s + 1) % period == 0 and len(groups) > 1:
            average()
    if steps % period and len(groups) > 1:
        average()
    return [q.data for q in models[0].parameters()]


def global_batch(B, steps, momentum):
    """ONE process on the global batch: synchronous SGD's contract."""
    return simulate([list(range(dt.size()))], 1, B, steps, momentum)


def close(got, want, what):
    for q, w in zip(got, want):
        np.testing.assert_allclose(q, w, rtol=1e-11, atol=1e-13, err_msg=f"{what} at {dt.size()} ranks")


@pytest.mark.mpi
@pytest.mark.parametrize("B", [1, 7, 16])  # fewer samples than ranks (empty shares), non-divisible
@pytest.mark.parametrize("momentum", [0.0, 0.9])  # SGD's update is linear in the gradient: both are sync
def test_local_1_is_synchronous_sgd(B, momentum):
    got, verdicts, _ = train("local:1", B, 4, momentum)
    assert all(verdicts)
    close(got, global_batch(B, 4, momentum), f"local:1 momentum {momentum} batch {B}")


@pytest.mark.mpi
@pytest.mark.parametrize("avg_state", [False, True])
def test_local_h_matches_one_process_replicas(avg_state):
    p = dt.size()
    got, _, rec = train("local:3", 7, 7, 0.9, local_average_state=avg_state)  # 7 steps: finish() averages step 7
    close(got, simulate([[r] for r in range(p)], 3, 7, 7, 0.9, avg_state), f"local:3 state {avg_state}")
    assert rec["sync_period"] == 3 and rec["sync_groups"] == p
    assert rec["bytes_sent_per_step"] > 0 if p > 1 else rec["bytes_sent_per_step"] == 0
    if p > 2:  # H > 1 really differs from synchronous SGD (the oracle could tell them apart)
        assert not np.allclose(got[0], global_batch(7, 7, 0.9)[0])


@pytest.mark.mpi
def test_local_outer_nesterov_diloco():
    p = dt.size()
    got, _, _ = train("local:2", 16, 4, 0.0, outer_lr=0.7, outer_momentum=0.9)
    close(got, simulate([[r] for r in range(p)], 2, 16, 4, outer=(0.7, 0.9)), "local:2 with the outer optimizer")


@pytest.mark.mpi
@pytest.mark.parametrize("G", [1, 2, 3])
def test_hybrid_matches_one_process_groups(G):
    p = dt.size()
    if G > p:
        mesh = dt.Mesh(p)
        with pytest.raises(ValueError, match=f"hybrid:{G} needs at least {G}"):
            make(f"hybrid:{G}", config(f"hybrid:{G}")).dp_group(mesh)  # the same verdict on every rank
        mesh.free()
        return
    groups = consecutive_groups(p, G)  # uneven when G does not divide p (2 groups of 3 ranks: [0, 1], [2])
    got, _, _ = train(f"hybrid:{G}", 7, 5, 0.9, hybrid_period=2)
    close(got, simulate(groups, 2, 7, 5, 0.9), f"hybrid:{G} groups {groups}")
    if G == 1:  # one group is synchronous data parallelism
        close(got, global_batch(7, 5, 0.9), "hybrid:1 vs the global batch")
    if G == p:  # one rank per group is local SGD
        close(got, train("local:2", 7, 5, 0.9)[0], f"hybrid:{p} vs local:2")


@pytest.mark.mpi
def test_hybrid_uneven_groups_period_1_is_synchronous():
    """Groups weigh by their size at the exchange: uneven groups at period 1 are sync SGD."""
    G = min(2, dt.size())
    got, _, _ = train(f"hybrid:{G}", 7, 3, 0.0, hybrid_period=1)
    close(got, global_batch(7, 3, 0.0), f"hybrid:{G} period 1")


@pytest.mark.mpi
@pytest.mark.parametrize("period", [1, 2])
def test_a_rank_that_skipped_every_step_before_the_exchange_averages_zero_state(period):
    """--local-average-state with momentum: the last rank's local steps before the first exchange
    are all non-finite, so its optimizer has no buffers yet there. Its flat buffer was shorter than
    its peers' and the exchange raised CollectiveError on every rank (the main job died on steps
    --on-nonfinite skip should skip); now it averages in zeros - the buffers it would have created -
    and every rank holds the averaged state (the oracle: one process, a replica per rank)."""
    p = dt.size()
    nan = {(p - 1, s) for s in range(period)}
    got, verdicts, _ = train(f"local:{period}", 16, 4, 0.9, nan_at=nan, local_average_state=True)
    if p == 1:  # one group: its verdict at once, every step
        assert verdicts == [False] * period + [True] * (4 - period)
    else:  # the skips are reported at the exchange, on every rank
        assert verdicts == [True] * (period - 1) + [False] + [True] * (4 - period)
    want = simulate([[r] for r in range(p)], period, 16, 4, 0.9, True, skip=nan)
    close(got, want, f"local:{period} with rank {p - 1}'s first {period} steps skipped")


@pytest.mark.mpi
def test_nonfinite_local_step_is_reported_at_the_exchange_on_every_rank():
    p = dt.size()
    got, verdicts, _ = train("local:2", 16, 4, nan_at=(p - 1, 2))
    # the step-4 exchange reports rank p-1's skip (one rank is one group: at once, as sync does)
    assert verdicts == ([True, True, False, True] if p == 1 else [True, True, True, False])
    assert all(np.isfinite(q).all() for q in got)
    gathered = dt.world().comm.allgather(got)
    for other in gathered[1:]:
        close(other, gathered[0], "replicas after the exchange")


def test_problems_name_the_flag():
    assert any("multiple of the exchange period 4" in m
               for m in problems("local:4", config("local:4", checkpoint_every=6)))
    assert problems("local:4", config("local:4", checkpoint_every=8)) == []
    assert any("hybrid-period" in m for m in problems("hybrid:2", config("hybrid:2", hybrid_period=3,
                                                                           stop_after_steps=4)))
    assert any("H, the local steps" in m for m in problems("local:x", config("local:x")))
    assert any("more than 8 groups" in m for m in problems("hybrid:9", config("hybrid:9")))
    assert any("--shard none" in m for m in problems("local:2", config("local:2", shard="optimizer")))
    assert any("outer-momentum" in m for m in problems("local:2", config("local:2", outer_momentum=0.9,
                                                                         checkpoint_dir="/tmp/x")))
    assert any("--eval-every 10 is not a multiple" in m
               for m in problems("local:4", config("local:4", eval_every=10)))
    assert any("sends no gradients" in m for m in problems("local:4", config("local:4", compression="fp16")))
    assert problems("hybrid:2", config("hybrid:2", compression="fp16")) == []
    assert problems("sync", config("sync", outer_lr=0.5)) == ["sync: --outer-lr applies to --sync local:... and "
                                                               "hybrid:..., not --sync sync"]
    assert any("--hybrid-period applies to --sync hybrid:..." in m
               for m in problems("local:2", config("local:2", hybrid_period=2)))
