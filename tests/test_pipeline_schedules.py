"""Pipeline schedules (one process): every order is complete and deadlock-free, its simulated bubble
is the paper's formula, the rules refuse what a schedule cannot run; the B/W split of the layers
against finite differences, B and W separately."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import nn
from disttrain.parallel.pipeline import SCHEDULES, assign, simulate
from disttrain.parallel.pipeline import stash as S
from disttrain.parallel.pipeline.schedules import kept, one_f_one_b, problem
from disttrain_zoo.transformer import Block, LMHead

CASES = [(name, p, m, v) for name in SCHEDULES for p in range(1, 7) for m in range(1, 13) for v in (1, 2, 3, 4)
         if problem(name, p, m, v) is None]


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_op_once_in_dependency_order_and_no_deadlock(name):
    cases = [c for c in CASES if c[0] == name]
    assert cases
    for _, p, m, v in cases:
        for s in range(p):
            ops = SCHEDULES[name](s, p, m, v)
            kinds = "FBW" if SCHEDULES[name].split else "FB"
            want = sorted((k, i, c) for k in kinds for i in range(m) for c in range(v))
            assert sorted(ops) == want, (name, p, m, v, s)
            pos = {op: n for n, op in enumerate(ops)}
            assert all(pos[("F", i, c)] < pos[("B", i, c)] for i in range(m) for c in range(v))
            if "W" in kinds:
                assert all(pos[("B", i, c)] < pos[("W", i, c)] for i in range(m) for c in range(v))
        simulate(name, p, m, v)  # raises on a deadlock


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_peak_live_formula_is_what_the_op_list_keeps(name):
    """fn.live (the closed form the README's memory table quotes) against counting the op lists,
    every stage, p = 1-6, m = 1-12, V = 1-4 where the schedule runs them."""
    fn = SCHEDULES[name]
    for _, p, m, v in (c for c in CASES if c[0] == name):
        for s in range(p):
            assert fn.live(s, p, m, v) == kept(fn(s, p, m, v), fn.split), (name, p, m, v, s)


def test_simulator_finds_a_deadlock():
    def backwards_first(stage, stages, m, chunks=1):  # the last stage's B before any F
        ops = one_f_one_b(stage, stages, m)
        return ops[::-1] if stage == stages - 1 else ops

    backwards_first.split = False
    with pytest.raises(RuntimeError, match="deadlocks"):
        simulate(backwards_first, 3, 4)


@pytest.mark.parametrize("p", [2, 3, 4, 5])
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16])
def test_simulated_bubble_is_the_formula(p, m):
    """Equal stage times: 1F1B and GPipe (p-1)/(m+p-1); interleaved (p-1)/(Vm+p-1) with chunks 1/V
    of a stage; ZB-H1 (p-1)(F+B-W) of idle per stage for m >= p - a third of 1F1B's idle time."""
    for name in ("gpipe", "1f1b"):
        assert simulate(name, p, m, 1, 1, 2)["bubble"] == pytest.approx(SCHEDULES[name].bubble(p, m, 1))
    for v in (2, 3):
        if problem("interleaved", p, m, v) is None:
            got = simulate("interleaved", p, m, v, 1 / v, 2 / v)["bubble"]
            assert got == pytest.approx(SCHEDULES["interleaved"].bubble(p, m, v))
            assert got < SCHEDULES["1f1b"].bubble(p, m, 1)
    zb, flush = simulate("zb1", p, m, 1, 1, 1, 1), simulate("1f1b", p, m, 1, 1, 1, 1)
    if m >= p:
        assert zb["bubble"] == pytest.approx(SCHEDULES["zb1"].bubble(p, m, 1, 1, 1, 1))
        idle = zb["makespan"] - 3 * m
        assert idle == pytest.approx((flush["makespan"] - 3 * m) / 3)
    assert zb["makespan"] <= flush["makespan"]


@pytest.mark.parametrize("p", [2, 3, 4, 5])
def test_zb2_bubble_is_its_formula_and_absorbs_the_hand_offs(p):
    """ZB-H2, synchronous: for m >= 2p - 1 the simulated idle is (p - 1) max(F, F + B - 2W) - the
    floor (p - 1) F of any synchronous step (the last stage starts after p - 1 forwards) when
    B <= 2W, below ZB-H1's (p - 1)(F + B - W) when B > W; never above ZB-H1 at any m; and with a
    hand-off latency d its extra warm-up forwards keep it below ZB-H1 for m >= 2p - 1."""
    for f, b, w in ((1, 1, 1), (1, 1.2, 0.8), (1, 1, 0.5), (1, 2, 0.2), (0.5, 1, 1)):
        for m in range(1, 3 * p + 2):
            zb2, zb1 = simulate("zb2", p, m, 1, f, b, w), simulate("zb1", p, m, 1, f, b, w)
            assert zb2["makespan"] <= zb1["makespan"] + 1e-12, (f, b, w, m)
            if m >= 2 * p - 1:
                assert zb2["bubble"] == pytest.approx(SCHEDULES["zb2"].bubble(p, m, 1, f, b, w)), (f, b, w, m)
                assert zb2["makespan"] - m * (f + b + w) == pytest.approx((p - 1) * max(f, f + b - 2 * w))
                if b > w:
                    assert zb2["makespan"] < zb1["makespan"] - 1e-9
    for m in (2 * p - 1, 4 * p):
        late = [simulate(name, p, m, 1, 1, 1, 1, latency=0.3)["makespan"] for name in ("zb2", "zb1")]
        assert late[0] < late[1], late


def test_simulator_takes_each_chunks_own_op_times():
    """Unequal stages (what the benchmark's 'played' theory uses): lists per global chunk. Uniform
    lists are the scalar case; GPipe with a slow second stage has the makespan one works out by hand
    (f0 + m f1 + m b1 + b0) and its idle share; a wrong-length list fails."""
    for name, p, m, v in (("1f1b", 3, 5, 1), ("interleaved", 2, 4, 2), ("zb1", 3, 4, 1)):
        n = p * v
        one = simulate(name, p, m, v, 0.5, 1.5, 0.7)
        many = simulate(name, p, m, v, [0.5] * n, [1.5] * n, [0.7] * n)
        assert many["makespan"] == pytest.approx(one["makespan"]) and many["bubble"] == pytest.approx(one["bubble"])
    got = simulate("gpipe", 2, 2, 1, [1.0, 2.0], [2.0, 4.0], [0.0, 0.0])
    assert got["makespan"] == pytest.approx(1 + 2 * 2 + 2 * 4 + 2)  # 15
    assert got["bubble"] == pytest.approx(1 - (6 + 12) / (2 * 15))
    with pytest.raises((IndexError, ValueError)):
        simulate("1f1b", 3, 2, 1, [1.0, 1.0], 2.0, 0.0)
    # a message latency d: GPipe's fill and drain cross p - 1 links each way: + 2 (p - 1) d
    lat = simulate("gpipe", 3, 4, 1, 1.0, 2.0, 0.0, latency=0.25)
    assert lat["makespan"] == pytest.approx(simulate("gpipe", 3, 4, 1, 1.0, 2.0)["makespan"] + 2 * 2 * 0.25)
    assert simulate("1f1b", 1, 4, 1, 1.0, 2.0, 0.0, latency=5.0)["makespan"] == pytest.approx(12.0)


def test_simulator_replays_single_ops_own_times():
    """A step replayed with its ops' own measured times (op_times, from Pipeline(trace=True)): 1F1B
    at p 2, m 4, F 1 and B 2 takes (m + p - 1) 3 = 15; the last stage's steady state has no slack,
    so its F of micro-batch 2 taking 1.5 makes the step 15.5 - one op's overshoot per micro-batch
    is what accumulates with m - and the busy time counts the 1.5; the first stage's F 0 at its
    default time changes nothing."""
    base = simulate("1f1b", 2, 4, 1, 1.0, 2.0)
    assert base["makespan"] == pytest.approx(15.0)
    slow = simulate("1f1b", 2, 4, 1, 1.0, 2.0, op_times={(1, "F", 2, 0): 1.5})
    assert slow["makespan"] == pytest.approx(15.5)
    assert slow["bubble"] == pytest.approx(1 - (12 + 12.5) / (2 * 15.5))
    same = simulate("1f1b", 2, 4, 1, 1.0, 2.0, op_times={(0, "F", 0, 0): 1.0})
    assert same["makespan"] == pytest.approx(15.0) and same["bubble"] == pytest.approx(base["bubble"])


def test_simulator_plays_the_runtimes_own_time_per_op():
    """`overhead` o (the runtime's time per op, measured as Pipeline.stats["runtime_s"]) delays each
    op's result and its rank but is not busy: one stage, 2m ops, idle 2m o; GPipe at p = 2, m = 2
    worked out by hand (every op on the chain pays o: 6 of them, 9 + 6 o); per stage lists too."""
    one = simulate("1f1b", 1, 4, 1, 1.0, 2.0, 0.0, overhead=0.5)
    assert one["makespan"] == pytest.approx(12.0 + 8 * 0.5) and one["bubble"] == pytest.approx(4 / 16)
    assert simulate("gpipe", 2, 2, 1, 1.0, 2.0, overhead=0.5)["makespan"] == pytest.approx(9 + 6 * 0.5)
    lists = simulate("gpipe", 2, 2, 1, 1.0, 2.0, overhead=[0.5, 0.0])
    assert lists["makespan"] == pytest.approx(9 + 4 * 0.5)  # only stage 0's four ops pay it
    for name, p, m, v in (("1f1b", 3, 8, 1), ("interleaved", 2, 4, 2), ("zb1", 3, 8, 1)):
        free = simulate(name, p, m, v, 1.0, 1.0, 1.0)["bubble"]
        assert simulate(name, p, m, v, 1.0, 1.0, 1.0, overhead=0.1)["bubble"] > free


def test_stash_plan_follows_attributes_that_appear_later():
    """The stash Plan works its holders out once, again only when the modules' attribute count
    changes: before a first forward no bytes are kept, after it the cache is, and an attribute a
    module gains later is stashed and restored too; parameters and sub-modules never are."""
    lin = nn.Linear(3, 2, rng=np.random.default_rng(0), dtype=np.float64)
    chunk = nn.Sequential(lin, nn.ReLU())
    plan = S.Plan(chunk)
    assert plan.state()[1] == 0  # (Linear starts with its caches set to None)
    x = np.ones((4, 3))
    chunk.forward(x)
    saved, nbytes = plan.state()
    names = {k for _, ks, _ in saved for k in ks}
    assert "layers" not in names and not any(isinstance(v, nn.module.Parameter) for _, _, vs in saved for v in vs)
    assert nbytes >= x.nbytes
    lin.late = np.zeros(5)  # a cache that appears after the plan was made
    saved, nbytes2 = plan.state()
    assert "late" in {k for _, ks, _ in saved for k in ks} and nbytes2 == nbytes + 40
    lin.late = None
    S.restore(saved)
    assert isinstance(lin.late, np.ndarray)


class _Swapper(nn.Module):
    """A custom layer whose cache changes name with its input's rank (same attribute count)."""

    def forward(self, x):
        vars(self).pop("_x2" if x.ndim == 3 else "_x3", None)
        setattr(self, "_x3" if x.ndim == 3 else "_x2", x)
        return x

    def backward(self, dy):
        return dy * (self._x3 if dy.ndim == 3 else self._x2)


def test_stash_plan_follows_an_attribute_swapped_for_another_of_the_same_count():
    """A module drops one cache and creates another: the attribute count is the same, the names
    are not (the plan kept the old name and failed with a KeyError on the pipeline stage)."""
    m = _Swapper()
    plan = S.Plan(nn.Sequential(m))
    m.forward(np.ones((2, 3)))
    assert plan.state()[1] == 48
    x3 = np.full((2, 3, 1), 2.0)
    m.forward(x3)
    saved, nbytes = plan.state()
    assert nbytes == 48 and [ks for _, ks, _ in saved] == [("_x3",)]
    m._x3 = None
    S.restore(saved)
    assert m._x3 is x3


def test_rules_refuse_clearly():
    assert "multiple of 3" in problem("interleaved", 3, 4, 2)
    assert "--virtual-stages >= 2" in problem("interleaved", 2, 4, 1)
    assert "need the interleaved schedule" in problem("1f1b", 2, 4, 2)
    assert "unknown pipeline schedule" in problem("zigzag", 2, 4, 1)
    assert "positive int" in problem("zb1", 2, 4, 0)
    assert "need the interleaved schedule" in problem("zb2", 3, 4, 2) and "positive int" in problem("zb2", 2, 4, 0)
    assert problem("interleaved", 3, 6, 3) is None and problem("zb1", 5, 1, 1) is None


def test_assign_is_round_robin_over_stages_times_chunks():
    got = assign([1.0] * 12, 3, 2)
    assert got == [[(0, 2), (6, 8)], [(2, 4), (8, 10)], [(4, 6), (10, 12)]]
    assert assign([1, 1, 1, 1], 2) == [[(0, 2)], [(2, 4)]]
    with pytest.raises(ValueError, match="cannot fill"):
        assign([1.0] * 5, 3, 2)


RNG = np.random.default_rng(3)
SPLIT_LAYERS = [
    (lambda: nn.Linear(5, 4, dtype=np.float64), (3, 5)),
    (lambda: nn.Linear(5, 4, bias=False, dtype=np.float64), (2, 3, 5)),
    (lambda: nn.Sequential(nn.Linear(4, 7, dtype=np.float64), nn.GELU(), nn.LayerNorm(7, dtype=np.float64),
                           nn.Linear(7, 3, dtype=np.float64)), (5, 4)),
    (lambda: nn.MultiHeadAttention(8, 2, rng=np.random.default_rng(1), dtype=np.float64), (2, 3, 8)),
    (lambda: Block(8, 2, 16, rng=np.random.default_rng(1), dtype=np.float64), (2, 3, 8)),
    (lambda: LMHead(8, 11, np.random.default_rng(1), np.float64), (2, 3, 8)),
    (lambda: nn.Tanh(), (3, 4)),  # a layer that does not split: the defaults
]


@pytest.mark.parametrize("make,shape", SPLIT_LAYERS)
def test_split_backward_b_and_w_each_match_finite_differences(make, shape):
    """B's input gradient and W's parameter gradients against central differences (float64), and
    W really deferred: after B alone, the split Linears' gradients are still zero."""
    m = make()
    x = RNG.standard_normal(shape)
    rep = dt.gradcheck(m, x, split=True)
    assert rep.ok, rep
    y = m.forward(x)
    dy = RNG.standard_normal(y.shape)
    dx_full = m.backward(dy.copy())
    full = [q.grad.copy() for q in m.parameters()]
    m.zero_grad()
    m.forward(x)
    dx = m.backward_input(dy.copy())
    np.testing.assert_allclose(dx, dx_full, rtol=1e-12, atol=1e-14)
    for mod in m.modules():
        if isinstance(mod, nn.Linear):
            assert not mod.weight.grad.any(), "W ran inside B"
    m.backward_weight()
    for q, want in zip(m.parameters(), full):
        np.testing.assert_allclose(q.grad, want, rtol=1e-12, atol=1e-14, err_msg=q.name)
    m.backward_weight()  # a second W without a B adds nothing
    for q, want in zip(m.parameters(), full):
        np.testing.assert_allclose(q.grad, want, rtol=1e-12, atol=1e-14, err_msg=q.name)
