"""Parameter servers (--sync ssp:S / async, parallel/sync/ps.py): ssp:0 reproduces one process on
the global batch; the SSP bound holds in the recorded clocks and times with a slow rank; every
pushed gradient is applied exactly once; every rank ends with the servers' values; bad set-ups
are refused on every rank."""
import time

import numpy as np
import pytest

import disttrain as dt
from disttrain import nn, optim
from disttrain.errors import CollectiveError
from disttrain.parallel.sync import client, server
from disttrain.parallel.sync.clock import FINAL, lead, violations
from disttrain.parallel.sync.ps import ParameterServer
from disttrain_zoo.mlp import MLP

#: The rank counts tests/test_mpi_suites.py runs this file at (the rule there: 1, 2, 3 and 5 always; 4 and
# 8 where they reach a case of their own). Here servers and workers split the ranks: 1 (no peer), 2, the
# odd counts 3 and 5 (uneven shares, an empty shard) and 8 (the most workers per server) - 4 reaches
# nothing of its own.
MPI_RANKS = (1, 2, 3, 5, 8)

STEPS = 6


def data(batch, sizes):
    rng = np.random.default_rng(7)
    return rng.standard_normal((STEPS, batch, sizes[0])), rng.integers(0, sizes[-1], (STEPS, batch))


def make_opt(kind, params):
    if kind == "sgd":
        return optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    if kind == "plain":
        return optim.SGD(params, lr=0.1)
    return optim.Adam(params, lr=0.01, weight_decay=1e-3)


def local_backward(model, loss, x, y, p, r):
    """This rank's share of the global batch (np.array_split: uneven, possibly empty), weighted so
    that the mean over the ranks is the global-batch gradient (workloads.train_step)."""
    idx = np.array_split(np.arange(len(x)), p)[r]
    if len(idx):
        loss.forward(model.forward(x[idx]), y[idx])
        model.backward(loss.backward() * (len(idx) * p / len(x)))


def reference(kind, batch, sizes):
    """ONE process on the global batch, synchronous: the parameters after every step, the state."""
    model, loss = MLP(sizes, dtype=np.float64), nn.SoftmaxCrossEntropy()
    opt = make_opt(kind, model.parameters())
    sched = optim.WarmupCosine(opt, total_steps=STEPS, warmup_steps=2)
    x, y = data(batch, sizes)
    after = []
    for s in range(STEPS):
        local_backward(model, loss, x[s], y[s], 1, 0)
        opt.step()
        opt.zero_grad()
        sched.step()
        after.append([q.data.copy() for q in model.parameters()])
    return after, opt


def workers(comm, kind, batch, sizes, staleness, slow=0.0, sched=None):
    """This rank trains through the parameter servers; returns (ps, model, opt)."""
    r = comm.Get_rank()
    model, loss = MLP(sizes, dtype=np.float64, seed=r), nn.SoftmaxCrossEntropy()
    dt.broadcast_parameters(model, root=0)
    opt = make_opt(kind, model.parameters())
    sched = sched(opt) if sched else optim.WarmupCosine(opt, total_steps=STEPS, warmup_steps=2)
    ps = ParameterServer(model.parameters(), opt, sched, staleness)
    return ps, model, opt, loss


# sizes: uneven parameters; [1, 1, 1] has 4 elements, fewer than 5 ranks (an empty shard).
# batch 7 does not divide over 2, 3, 4, 5 ranks; batch 3 leaves ranks without samples.
@pytest.mark.mpi
@pytest.mark.parametrize("kind,batch,sizes", [("sgd", 7, [6, 9, 4]), ("adam", 7, [6, 9, 4]),
                                              ("sgd", 3, [1, 1, 1])])
def test_ssp0_reproduces_one_process_on_the_global_batch(comm, kind, batch, sizes):
    p, r = comm.Get_size(), comm.Get_rank()
    want, want_opt = reference(kind, batch, sizes)
    ps, model, opt, loss = workers(comm, kind, batch, sizes, 0)
    x, y = data(batch, sizes)
    for s in range(STEPS):
        local_backward(model, loss, x[s], y[s], p, r)
        assert ps.step(s)
        for q in model.parameters():
            q.grad[...] = 0
        for q, w in zip(model.parameters(), want[s]):  # every step, on every rank: the synchronous values
            np.testing.assert_allclose(q.data, w, rtol=1e-10, atol=1e-13, err_msg=f"step {s} {q.name}")
    ps.finish(opt)
    for q, w in zip(model.parameters(), want[-1]):
        np.testing.assert_allclose(q.data, w, rtol=1e-10, atol=1e-13, err_msg=q.name)
    assert opt.steps == STEPS
    for name, st in want_opt.state.items():  # the servers' optimizer state, gathered per parameter
        for key, v in st.items():
            np.testing.assert_allclose(opt.state[name][key], v, rtol=1e-10, atol=1e-13, err_msg=f"{name}/{key}")
    assert all(a.applied == a.computed_on for a in ps.server.applied)  # staleness 0 throughout
    assert len(ps.server.applied) == STEPS * p


@pytest.mark.mpi
def test_records_stay_bounded_and_the_count_stays_exact(comm, monkeypatch):
    """A long run keeps only the newest RECORDS pulls/steps/applied updates (memory bounded),
    while the servers' count of applied updates stays exact."""
    monkeypatch.setattr(server, "RECORDS", 3)
    monkeypatch.setattr(client, "RECORDS", 3)
    p, r = comm.Get_size(), comm.Get_rank()
    ps, model, opt, loss = workers(comm, "plain", 7, [6, 9, 4], 0)
    x, y = data(7, [6, 9, 4])
    for s in range(STEPS):
        local_backward(model, loss, x[s], y[s], p, r)
        assert ps.step(s)
        opt.zero_grad()
    ps.finish(opt)
    assert ps.server.applied_total == STEPS * p == ps.stats()["applied"]
    assert len(ps.server.applied) == len(ps.trace) == 3 and len(ps.pulls) <= 3
    assert [a.clock for a in ps.server.applied] == sorted(a.clock for a in ps.server.applied)  # the newest kept
    assert ps.server.applied[-1].clock == STEPS - 1


def _gathered_records(comm, ps):
    return comm.allgather((list(ps.pulls), list(ps.trace), list(ps.server.applied)))


def _train_plain_sgd_and_check(comm, ps, model, opt, loss, steps, batch, sleep, what):
    """Push `steps` gradients of this rank's batches (sleeping sleep(s) before each push), then
    check exactly-once application: plain SGD at a constant rate ends at initial - lr / P * the
    sum of every gradient pushed by any rank."""
    w0 = [q.data.copy() for q in model.parameters()]
    pushed = [np.zeros_like(q.data) for q in model.parameters()]
    for s in range(steps):
        x, y = batch(s)
        local_backward(model, loss, x, y, 1, 0)
        for acc, q in zip(pushed, model.parameters()):
            acc += q.grad
        time.sleep(sleep(s))
        ps.step(s)
        for q in model.parameters():
            q.grad[...] = 0
    ps.finish(opt)
    total = [comm.allreduce(a) for a in pushed]
    for q, a, t in zip(model.parameters(), w0, total):
        np.testing.assert_allclose(q.data, a - 0.1 / comm.Get_size() * t, rtol=1e-9, atol=1e-12, err_msg=(what, q.name))


@pytest.mark.mpi
@pytest.mark.parametrize("staleness", [1, 2, None])
def test_staleness_bound_holds_with_a_slow_rank(comm, staleness):
    """The last rank sleeps every step; SSP: no worker starts step t before every worker pushed
    step t - S - 1 - from the servers' clock vectors AND from the workers' own times; async: the
    others run ahead. Every pushed gradient is applied exactly once (plain SGD, constant rate:
    final = initial - lr / P * sum of every gradient pushed)."""
    p, r = comm.Get_size(), comm.Get_rank()
    steps, sizes = 10, [5, 7, 3]
    ps, model, opt, loss = workers(comm, "plain", 12, sizes, staleness, sched=optim.Schedule)
    rng = np.random.default_rng(r)
    _train_plain_sgd_and_check(comm, ps, model, opt, loss, steps,
                               lambda s: (rng.standard_normal((3, sizes[0])), rng.integers(0, sizes[-1], 3)),
                               lambda s: 0.03 if r == p - 1 and p > 1 else 0.0, "slow last rank")
    flat = np.concatenate([q.data.ravel() for q in model.parameters()])
    assert all(np.array_equal(flat, f) for f in comm.allgather(flat))  # every rank: the servers' values

    recs = _gathered_records(comm, ps)
    pulls = [x for pl, _, _ in recs for x in pl]
    assert len(pulls) == p * p * (steps + 1) and sum(x.step == FINAL for x in pulls) == p * p
    assert all(min(x.clocks) == steps for x in pulls if x.step == FINAL)
    stale = [a.applied - a.computed_on for _, _, ap in recs for a in ap]
    assert len(stale) == p * p * steps and min(stale) >= 0  # every server: every push
    leads = [lead(x) for x in pulls if x.step != FINAL]
    if staleness is None:
        if p > 1:  # nobody waited for the slow rank: the fast ones ran ahead of it
            assert max(leads) > 2, leads
        return
    assert violations(pulls, staleness) == []
    assert max(stale) <= staleness
    if p > 1:  # the slow rank really held the others back to the bound (the check had work to do)
        assert max(leads) == staleness, leads
    # the same bound from the workers' own clocks: start of (w, t) after push of (v, t - S - 1)
    pushed_at = {(v, t): push for v, (_, tr, _) in enumerate(recs) for t, _, push in tr}
    for w, (_, tr, _) in enumerate(recs):
        for t, start, _ in tr:
            for v in range(p):
                if t - staleness - 1 >= 0:
                    assert pushed_at[(v, t - staleness - 1)] < start, (w, t, v)


@pytest.mark.mpi
def test_refused_on_every_rank(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    model = MLP([3, 4, 2], dtype=np.float64)
    opt = optim.SGD(model.parameters(), lr=0.1)
    sched = optim.Schedule(opt)
    with pytest.raises(CollectiveError, match="LAMB needs whole-tensor norms"):
        lamb = optim.LAMB(model.parameters()) if r == p - 1 else opt
        ParameterServer(model.parameters(), lamb, sched, 1)
    if p > 1:
        with pytest.raises(CollectiveError, match="staleness"):  # ranks disagree on S
            ParameterServer(model.parameters(), opt, sched, 1 if r else 2)
    shard = MLP([3, 4, 2], dtype=np.float64)
    shard.parameters()[0].replicated = r != 0  # a model-parallel shard on one rank only
    with pytest.raises(CollectiveError, match="replicated parameters with dense gradients"):
        ParameterServer(shard.parameters(), optim.SGD(shard.parameters(), lr=0.1), sched, 1)
    with pytest.raises(CollectiveError, match="staleness must be >= 0"):
        ParameterServer(model.parameters(), opt, sched, -1)
    ps = ParameterServer(model.parameters(), opt, sched, None)  # the failures left nothing behind
    with pytest.raises(ValueError, match="this worker is at step 0"):
        ps.step(3)
    ps.step(0)
    ps.finish()


@pytest.mark.mpi
@pytest.mark.parametrize("staleness", [0, None])
def test_collectives_between_steps_do_not_meet_the_servers_traffic(comm, staleness):
    """The servers talk on a communicator of their own: a user's collectives between the steps
    (blocking and asynchronous, on the world) get their own results, and the servers theirs."""
    p, r = comm.Get_size(), comm.Get_rank()
    sizes = [4, 6, 3]
    ps, model, opt, loss = workers(comm, "plain", 6, sizes, staleness, sched=optim.Schedule)
    w0 = [q.data.copy() for q in model.parameters()]
    pushed = [np.zeros_like(q.data) for q in model.parameters()]
    rng = np.random.default_rng(10 + r)
    for s in range(5):
        h = dt.allreduce_async(np.full(1000, r + s, np.float64))
        local_backward(model, loss, rng.standard_normal((2, sizes[0])), rng.integers(0, sizes[-1], 2), 1, 0)
        for acc, q in zip(pushed, model.parameters()):
            acc += q.grad
        ps.step(s)
        for q in model.parameters():
            q.grad[...] = 0
        assert np.array_equal(dt.allreduce(np.full(7, s + 1.0)), np.full(7, p * (s + 1.0)))
        assert np.array_equal(h.wait(), np.full(1000, p * (p - 1) / 2 + p * s))
    ps.finish(opt)
    total = [comm.allreduce(a) for a in pushed]
    for q, a, t in zip(model.parameters(), w0, total):
        np.testing.assert_allclose(q.data, a - 0.1 / p * t, rtol=1e-9, atol=1e-12, err_msg=q.name)


@pytest.mark.mpi
@pytest.mark.parametrize("per_rank", [8, 0.5, 0])
def test_update_budget_is_exact_and_fast_workers_do_more(comm, per_rank):
    """async with a global update budget (--sync async's --steps x P): the slow last rank does
    fewer steps than every fast one; the servers apply exactly `budget` pushes in total, each once,
    with the learning rate of the global step (pushes applied // P) - checked against every
    worker's recorded gradients, shard by shard; a budget below P (some workers never step) and a
    budget of 0 end too."""
    p, r = comm.Get_size(), comm.Get_rank()
    budget, sizes, warm = int(per_rank * p), [5, 7, 3], 3
    model, loss = MLP(sizes, dtype=np.float64, seed=r), nn.SoftmaxCrossEntropy()
    dt.broadcast_parameters(model, root=0)
    opt = optim.SGD(model.parameters(), lr=0.1)
    sched = optim.Schedule(opt, warmup_steps=warm)  # lr(t) = 0.1 min(1, (t + 1) / 3): the step matters
    ps = ParameterServer(model.parameters(), opt, sched, None, budget=budget)
    w0 = np.concatenate([q.data.ravel() for q in model.parameters()])
    grads, rng = [], np.random.default_rng(r)
    while ps.more:
        x, y = rng.standard_normal((3, sizes[0])), rng.integers(0, sizes[-1], 3)
        local_backward(model, loss, x, y, 1, 0)
        grads.append(np.concatenate([q.grad.ravel() for q in model.parameters()]))
        if r == p - 1 and p > 1:
            time.sleep(0.03)
        ps.step()
        for q in model.parameters():
            q.grad[...] = 0
    with pytest.raises(ValueError, match="budget .* is spent"):
        ps.step()
    ps.finish(opt)
    steps = comm.allgather(ps.clock)
    assert sum(steps) == budget, steps
    applied = comm.allgather(list(ps.server.applied))
    assert all(len(a) == budget for a in applied)  # every server applied every push, none beyond
    assert all(sorted((x.worker, x.clock) for x in a) == sorted((w, c) for w in range(p) for c in range(steps[w]))
               for a in applied)  # each push exactly once
    if per_rank >= 1 and p > 1:
        assert steps[-1] < min(steps[:-1]), steps  # the straggler did the fewest: the others did its share
    everyone = comm.allgather(grads)
    expect = w0.copy()
    for s, (lo, hi) in enumerate(ps.bounds):
        for a in applied[s]:
            lr = 0.1 * min(1.0, (a.applied // p + 1) / warm)
            expect[lo:hi] -= lr / p * everyone[a.worker][a.clock][lo:hi]
    flat = np.concatenate([q.data.ravel() for q in model.parameters()])
    np.testing.assert_allclose(flat, expect, rtol=1e-12, atol=1e-14)
    assert all(np.array_equal(flat, f) for f in comm.allgather(flat))  # every rank: the servers' values


@pytest.mark.mpi
def test_update_budget_refused_on_every_rank(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    model = MLP([3, 4, 2], dtype=np.float64)
    opt = optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(CollectiveError, match="update budget needs asynchronous servers"):
        ParameterServer(model.parameters(), opt, optim.Schedule(opt), 1 if r == 0 else None, budget=4)
    if p > 1:
        with pytest.raises(CollectiveError, match="budget"):  # ranks disagree on the budget
            ParameterServer(model.parameters(), opt, optim.Schedule(opt), None, budget=4 + (r == p - 1))


@pytest.mark.mpi
@pytest.mark.parametrize("seed", [1, 2, 4, 11])  # S = 1, async, 3, 0
def test_random_delays_keep_the_bound_and_apply_every_push_once(comm, seed):
    """Randomized (tests/fuzz_program.py's style: one seed draws the same program on every rank):
    the staleness, the steps, and a sleep for every (rank, step) - so any rank may be the slow
    one at any time, not one persistent straggler. From the records: no pull breaks the bound,
    every server applied every push exactly once (one Applied per (worker, clock)), and plain SGD
    at a constant rate ends at initial - lr / P * the sum of every pushed gradient."""
    p, r = comm.Get_size(), comm.Get_rank()
    rng = np.random.default_rng(seed)
    staleness = [0, 1, 3, None][int(rng.integers(0, 4))]
    steps = int(rng.integers(3, 9))
    sleeps = rng.exponential(0.004, (p, steps)) * (rng.random((p, steps)) < 0.5)
    sizes = [5, 7, 3]
    ps, model, opt, loss = workers(comm, "plain", 4, sizes, staleness, sched=optim.Schedule)
    mine = np.random.default_rng([seed, r])
    _train_plain_sgd_and_check(comm, ps, model, opt, loss, steps,
                               lambda s: (mine.standard_normal((2, sizes[0])), mine.integers(0, sizes[-1], 2)),
                               lambda s: sleeps[r, s], f"seed {seed}")
    recs = _gathered_records(comm, ps)
    pulls = [x for pl, _, _ in recs for x in pl]
    assert len(pulls) == p * p * (steps + 1)
    applied = [(server, a.worker, a.clock) for server, (_, _, ap) in enumerate(recs) for a in ap]
    assert sorted(applied) == sorted((s, w, c) for s in range(p) for w in range(p) for c in range(steps)), seed
    if staleness is not None:
        assert violations(pulls, staleness) == [], (seed, staleness)
        assert all(a.applied - a.computed_on <= staleness for _, _, ap in recs for a in ap), (seed, staleness)
