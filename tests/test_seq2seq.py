"""Attention and GNMT-lite against central finite differences (float64); the text corpus task."""
import numpy as np
import pytest

from disttrain import nn
from disttrain.data import text
from disttrain_zoo.gnmt import GNMT

from ._fd import numeric_grad

RNG = np.random.default_rng(11)


@pytest.mark.parametrize("lengths", [None, np.array([5, 2, 0])])
def test_attention_gradients_match_finite_differences(lengths):
    """dq, dk (keys and values) and dW of L = <context, g>, with padded keys masked (a row with
    no keys at all attends to nothing and gets zero context)."""
    m = nn.Attention(4, 3, rng=np.random.default_rng(1), dtype=np.float64)
    q, k, g = RNG.standard_normal((3, 4, 4)), RNG.standard_normal((3, 5, 3)), RNG.standard_normal((3, 4, 3))

    def loss():
        return float(np.sum(m.forward(q, k, lengths) * g))

    ctx = m.forward(q, k, lengths)
    m.w.grad[...] = 0
    dq = m.backward(g.copy())
    dk = m.dk
    for arr, ana, name in [(q, dq, "q"), (k, dk, "k"), (m.w.data, m.w.grad, "w")]:
        np.testing.assert_allclose(ana, numeric_grad(loss, arr), rtol=1e-6, atol=1e-8, err_msg=name)
    if lengths is not None:
        assert np.all(m.weights[1, :, 2:] == 0) and np.allclose(m.weights[1].sum(-1), 1)
        assert np.all(ctx[2] == 0)


def test_gnmt_gradients_match_finite_differences():
    """Every parameter of the whole model - embeddings, both LSTM stacks (encoder state handed to
    the decoder), attention, combiner, output - through masked cross-entropy, with padding."""
    model = GNMT(vocab=9, emb=3, hidden=4, layers=2, seed=5, dtype=np.float64)
    src = np.array([[4, 5, 6, 7], [8, 4, 0, 0]])
    src_len = np.array([4, 2])
    tgt_in = np.array([[1, 7, 6, 5], [1, 4, 8, 0]])
    tgt_out = np.array([[7, 6, 5, 2], [4, 8, 2, 0]])
    loss_fn = nn.SoftmaxCrossEntropy(ignore_index=0)

    def loss():
        return loss_fn.forward(model.forward((src, src_len, tgt_in)), tgt_out)

    model.zero_grad()
    loss()
    model.backward(loss_fn.backward())
    params = model.parameters()
    assert len(params) == 2 + 2 * 2 * 3 + 1 + 2 + 2
    for p in params:
        num = numeric_grad(loss, p.data)
        if p.name.endswith("emb.weight"):  # the PAD row gets no gradient by design
            num[0] = 0
        np.testing.assert_allclose(p.grad, num, rtol=1e-5, atol=1e-8, err_msg=p.name)


def test_gnmt_reports_every_parameter_ready_during_backward():
    model = GNMT(vocab=7, emb=3, hidden=4, layers=2, seed=0, dtype=np.float64)
    names = sorted(p.name for p in model.parameters())  # named from the root, as DataParallel does
    seen = []
    for m in model.modules():  # as DataParallel hooks every container
        m._grad_hook = lambda ps: seen.extend(p.name for p in ps if p.name not in seen)
    loss_fn = nn.SoftmaxCrossEntropy(ignore_index=0)
    src, tgt = np.array([[4, 5, 6]]), np.array([[1, 6, 5]])
    loss_fn.forward(model.forward((src, np.array([3]), tgt)), np.array([[6, 5, 2]]))
    model.backward(loss_fn.backward())
    assert sorted(seen) == names
    assert seen[:2] == ["layers.6.out.weight", "layers.6.out.bias"] and seen[-1] == "layers.0.emb.weight"


def test_reverse_corpus_is_real_text_with_varied_lengths():
    data = text.load_reverse_corpus(vocab_size=500)
    assert len(data) > 3000
    lens = data.lengths
    assert lens.min() >= 4 and lens.max() <= 41 and np.percentile(lens, 95) > 2 * np.percentile(lens, 25)
    words = [data.vocab[i] for i in data.src[0]]
    assert all(isinstance(w, str) for w in words) and len(data.vocab) == 500
    for s, t in zip(data.src[:50], data.tgt[:50]):
        assert t[-1] == text.EOS and np.array_equal(t[:-1], s[::-1])
    src, s_len, tin, tout = data.batch([0, 1, 2])
    assert src.shape == (3, s_len.max()) and np.all(tin[:, 0] == text.BOS)
    assert np.array_equal(tin[:, 1:][tout[:, 1:] != 0], tout[:, :-1][tout[:, 1:] != 0])
    train, test = text.split(data, 0.1)
    assert len(train) + len(test) == len(data)
