"""Length bucketing strategies: completeness, determinism, equal step counts, padding and balance."""
import numpy as np
import pytest

from disttrain.data import STRATEGIES, Batcher

LENS = np.clip(np.random.default_rng(0).lognormal(2.6, 0.6, 4999).astype(int), 1, 120)  # 4999: divides nothing


def sizing(p):
    return [dict(global_batch=48 * p), dict(max_tokens=1000)]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("p", [1, 2, 3, 5])
def test_every_sample_exactly_once_and_equal_steps(strategy, p):
    for kw in sizing(p):
        plan = Batcher(LENS, strategy, p, seed=3, **kw).plan(epoch=1)
        assert all(len(step) == p for step in plan.steps)  # every rank has every step
        seen = np.concatenate([i for step in plan.steps for i in step])
        assert np.array_equal(np.sort(seen), np.arange(LENS.size)), (strategy, p, kw)
        for r in range(p):
            assert len(plan.batches(r)) == len(plan)
        if "max_tokens" in kw:
            for step in plan.steps:
                for idx in step:
                    assert len(idx) * (LENS[idx].max() if len(idx) else 0) <= kw["max_tokens"]
        else:
            assert all(len(i) <= kw["global_batch"] // p for step in plan.steps for i in step)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_deterministic_per_epoch_and_reshuffled_between_epochs(strategy):
    a = Batcher(LENS, strategy, 3, seed=7, max_tokens=1500)
    b = Batcher(LENS.copy(), strategy, 3, seed=7, max_tokens=1500)  # another "rank", no communication
    pa, pb, pc = a.plan(2), b.plan(2), a.plan(3)
    assert all(np.array_equal(x, y) for s, t in zip(pa.steps, pb.steps) for x, y in zip(s, t))
    assert not all(np.array_equal(x, y) for s, t in zip(pa.steps, pc.steps) for x, y in zip(s, t))


def test_load_balanced_removes_padding_and_imbalance_that_naive_has():
    p = 4
    res = {s: Batcher(LENS, s, p, seed=1, max_tokens=2000).plan(0).summary() for s in STRATEGIES}
    assert res["naive"]["padding"] > 0.3
    assert res["load_balanced"]["padding"] < 0.5 * res["naive"]["padding"]
    assert res["bucketed"]["padding"] < 0.5 * res["naive"]["padding"]
    assert res["load_balanced"]["imbalance_mean"] <= 1.05 < res["bucketed"]["imbalance_mean"]


@pytest.mark.parametrize("kwargs,msg", [
    (dict(strategy="sorted", world=2, global_batch=4), "unknown batching strategy"),
    (dict(strategy="naive", world=3, global_batch=10), "divisible by the 3 ranks"),
    (dict(strategy="naive", world=2), "exactly one of"),
    (dict(strategy="naive", world=2, global_batch=4, max_tokens=10), "exactly one of"),
    (dict(strategy="naive", world=2, max_tokens=50), "smaller than the longest sample"),
    (dict(strategy="naive", world=0, global_batch=4), "world must be a positive int")])
def test_bad_configurations_are_explained(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        Batcher(np.array([3, 5, 80]), **kwargs)


def test_fewer_samples_than_ranks_gives_empty_batches_not_missing_steps():
    plan = Batcher(np.array([4, 9, 2]), "load_balanced", 5, global_batch=5).plan(0)
    assert len(plan) == 1 and sum(len(i) for i in plan.steps[0]) == 3
    assert plan.step_stats(0)["padded_tokens"].tolist().count(0) == 2


@pytest.mark.parametrize("p", [2, 3, 5])
def test_load_balanced_global_batches_are_the_same_at_any_world(p):
    """An elastic restart on another number of ranks continues the same run: with a global batch
    (divisible by p or not) every step trains the same samples as one process."""
    lengths = np.random.default_rng(4).integers(1, 30, 103)
    one = Batcher(lengths, "load_balanced", 1, global_batch=16, seed=2).plan(0)
    many = Batcher(lengths, "load_balanced", p, global_batch=16, seed=2).plan(0)
    assert len(one) == len(many)
    for s in range(len(one)):
        shares = many.steps[s]
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        assert sorted(np.concatenate(shares).tolist()) == sorted(one.steps[s][0].tolist())
