"""The DLRM and transformer models, their new layers and loss, against finite differences (float64)."""
import numpy as np
import pytest

from disttrain import nn
from disttrain.data.clicks import power_law_ids, split, synthetic_clicks
from disttrain_zoo.dlrm import DLRM, DotInteraction
from disttrain_zoo.transformer import Transformer

from ._fd import numeric_grad
from .test_nn import fd_check

RNG = np.random.default_rng(1)


@pytest.mark.parametrize("causal", [True, False])
def test_multi_head_attention_matches_finite_differences(causal):
    fd_check(nn.MultiHeadAttention(8, 2, causal=causal, rng=RNG, dtype=np.float64), RNG.standard_normal((2, 5, 8)))


def test_attention_is_causal_and_heads_must_divide():
    m = nn.MultiHeadAttention(8, 4, rng=RNG, dtype=np.float64)
    x = RNG.standard_normal((2, 6, 8))
    x2 = x.copy()
    x2[:, 4:] += 1.0  # the future must not change the past
    np.testing.assert_array_equal(m.forward(x)[:, :4], m.forward(x2)[:, :4])
    assert not np.allclose(m.forward(x)[:, 4:], m.forward(x2)[:, 4:])
    with pytest.raises(ValueError, match="not divisible by heads=3"):
        nn.MultiHeadAttention(8, 3)


def test_bce_with_logits_gradient_and_stability():
    z = RNG.standard_normal((7, 1))
    y = (RNG.random((7, 1)) < 0.5).astype(np.float64)
    loss = nn.BCEWithLogits()
    loss.forward(z, y)
    num = numeric_grad(lambda: loss.forward(z, y), z)
    loss.forward(z, y)
    np.testing.assert_allclose(loss.backward(), num, rtol=1e-6, atol=1e-9)
    assert np.isfinite(loss.forward(np.array([[1e4], [-1e4]]), np.array([0.0, 1.0])))
    assert loss.forward(np.array([[50.0]]), np.array([1.0])) < 1e-20
    with pytest.raises(ValueError, match="0 or 1"):
        loss.forward(z, y * 2)


def test_dot_interaction_matches_finite_differences():
    m = DotInteraction()
    b, e = RNG.standard_normal((3, 4)), RNG.standard_normal((3, 2, 4))
    out = m.forward((b, e))
    assert out.shape == (3, 4 + 3)
    np.testing.assert_allclose(out[:, 4], (b * e[:, 0]).sum(1))  # <b, e_1>
    g = RNG.standard_normal(out.shape)
    m.forward((b, e))
    db, de = m.backward(g)
    loss = lambda: float((m.forward((b, e)) * g).sum())  # noqa: E731
    np.testing.assert_allclose(db, numeric_grad(loss, b), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(de, numeric_grad(loss, e), rtol=1e-6, atol=1e-9)


def _model_fd(model, inputs, targets, loss_fn, rtol=1e-5):
    loss = lambda: loss_fn.forward(model.forward(inputs), targets)  # noqa: E731
    loss()
    model.backward(loss_fn.backward())
    for p in model.parameters():
        np.testing.assert_allclose(p.grad, numeric_grad(loss, p.data), rtol=rtol, atol=1e-8, err_msg=p.name)


def test_dlrm_gradients_match_finite_differences():
    d = synthetic_clicks(16, sizes=(9, 5, 3), dense=3, seed=2, dtype=np.float64)
    m = DLRM(d.sizes, dim=3, dense=3, bottom=(4,), top=(5,), dtype=np.float64)
    _model_fd(m, (d.dense, d.ids), d.clicks, nn.BCEWithLogits())


def test_transformer_gradients_match_finite_differences():
    ids = RNG.integers(0, 11, (2, 5))
    m = Transformer(11, d=8, heads=2, layers=2, ffn=12, max_len=6, dtype=np.float64)
    _model_fd(m, ids, RNG.integers(0, 11, (2, 5)), nn.SoftmaxCrossEntropy())
    with pytest.raises(ValueError, match="seq <= 6"):
        m.forward(np.zeros((1, 7), np.int64))


def test_power_law_ids_and_clicks():
    rng = np.random.default_rng(0)
    ids = power_law_ids(rng, 200_000, 1000, 1.05)
    counts = np.sort(np.bincount(ids, minlength=1000))[::-1]
    # Zipf: the hottest id is ~2**1.05 times as frequent as the second and the top 1% hold a large share
    assert 1.7 < counts[0] / counts[1] < 2.5
    assert counts[:10].sum() / ids.size > 0.3
    assert ids.min() >= 0 and ids.max() < 1000
    d = synthetic_clicks(5000, seed=3)
    tr, te = split(d, 0.2)
    assert len(tr) == 4000 and len(te) == 1000 and 0.05 < d.clicks.mean() < 0.95
    # the teacher depends on the seed only: same seed, same first samples
    np.testing.assert_array_equal(synthetic_clicks(10, seed=3).ids, synthetic_clicks(10, seed=3).ids)


def test_auc_matches_pairwise_count_with_ties():
    from disttrain.workloads import _auc

    rng = np.random.default_rng(4)
    score = rng.integers(0, 6, 300).astype(float)  # many ties
    y = (rng.random(300) < 0.4).astype(float)
    pos, neg = score[y > 0.5], score[y < 0.5]
    want = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert _auc(score, y) == pytest.approx(want, rel=1e-12)
    # one class only (a test split of a few samples): undefined, not 0.0 (a perfectly inverted ranking)
    assert np.isnan(_auc(score[:5], np.zeros(5))) and np.isnan(_auc(score[:5], np.ones(5)))


def test_click_evaluation_of_a_test_split_with_one_class():
    """A few test samples, all unclicked: the base rate's log-loss is 0 (it was NaN) and the AUC
    undefined (it was 0.0)."""
    from types import SimpleNamespace

    from disttrain.workloads import ClickPrediction

    test = SimpleNamespace(dense=np.zeros((3, 2)), ids=np.zeros((3, 1), np.int64), clicks=np.zeros(3),
                           bayes_logloss=0.1)
    model = SimpleNamespace(forward=lambda inputs: np.array([[-1.0], [0.5], [-2.0]]))
    got = ClickPrediction.evaluate(SimpleNamespace(test=test), model)
    assert got["base_rate_logloss"] == 0.0 and np.isnan(got["test_auc"]) and got["test_accuracy"] == 2 / 3, got


@pytest.mark.parametrize("model,flags,msg", [
    ("transformer", ["--seq-len", "90", "--global-batch-size", "2"], "seq-len 90 leaves no held-out window"),
    ("dlrm", ["--samples", "5", "--global-batch-size", "2", "--tables", "5,3"], "samples 5 leave no test samples")])
def test_a_workload_without_held_out_data_is_refused_at_set_up(model, flags, msg, monkeypatch):
    """attack5: a --seq-len longer than the test split's token stream left no test window, and the
    transformer's evaluation divided by zero at the end of the run, before its final checkpoint;
    dlrm with < 6 samples evaluated an empty split (NaN metrics). Refused when the workload is
    built, where every rank decides the same (job/setup.py agrees on set-up errors)."""
    from disttrain.data import text
    from disttrain.job.config import parse_config
    from disttrain.workloads import WORKLOADS

    src = [np.array([4 + i % 5, 5, 6 + i % 3], np.int64) for i in range(400)]  # not the stdlib's (seconds)
    monkeypatch.setattr(text, "load_reverse_corpus", lambda **kw: text.Seq2Seq(
        src, [np.concatenate([s[::-1], [text.EOS]]) for s in src], text.SPECIALS + list("abcdefgh")))
    cfg = parse_config(["--model", model, *flags])
    with pytest.raises(ValueError, match=msg):
        WORKLOADS[model](cfg, 0, 1, None)
