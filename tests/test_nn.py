"""Every layer's gradients against central finite differences (float64); kernels vs NumPy twins."""
import glob
import os

import numpy as np
import pytest

from disttrain import nn
from disttrain.nn import blas
from disttrain.nn import kernels as K

from ._fd import numeric_grad

RNG = np.random.default_rng(0)


def fd_check(module, x, rtol=1e-6, atol=1e-8, eps=1e-6):
    """Compare backward() with central differences of L = sum(forward(x) * g)."""
    y = module.forward(x.copy())
    g = RNG.standard_normal(y.shape)
    for p in module.parameters():
        p.grad[...] = 0
    module.forward(x.copy())
    dx = module.backward(g.copy())
    loss = lambda: float(np.sum(module.forward(x_) * g))  # noqa: E731
    x_ = x.copy()
    if dx is not None:
        np.testing.assert_allclose(dx, numeric_grad(loss, x_, eps), rtol=rtol, atol=atol)
    for p in module.parameters():
        np.testing.assert_allclose(p.grad, numeric_grad(loss, p.data, eps), rtol=rtol, atol=atol, err_msg=p.name)


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Linear(5, 4, dtype=np.float64), (3, 5)),
    (lambda: nn.Linear(5, 4, bias=False, init="xavier", dtype=np.float64), (2, 3, 5)),
    (lambda: nn.ReLU(), (4, 6)),
    (lambda: nn.GELU(), (4, 6)),
    (lambda: nn.Tanh(), (4, 6)),
    (lambda: nn.Sigmoid(), (4, 6)),
    (lambda: nn.LayerNorm(6, dtype=np.float64), (3, 6)),
    (lambda: nn.Sequential(nn.Linear(4, 7, dtype=np.float64), nn.GELU(), nn.LayerNorm(7, dtype=np.float64),
                           nn.Linear(7, 3, dtype=np.float64), nn.Tanh()), (5, 4)),
])
def test_layer_gradients_match_finite_differences(make, shape):
    m = make()
    x = RNG.standard_normal(shape)
    if isinstance(m, nn.ReLU):
        x[np.abs(x) < 1e-3] = 0.5  # keep clear of the kink
    if isinstance(m, nn.LayerNorm):
        m.weight.data[...] = RNG.standard_normal(m.weight.data.shape)
        m.bias.data[...] = RNG.standard_normal(m.bias.data.shape)
    fd_check(m, x)


def test_embedding_gradient_and_padding():
    e = nn.Embedding(6, 3, padding_idx=0, dtype=np.float64)
    assert np.all(e.weight.data[0] == 0)
    ids = np.array([[1, 0, 3], [3, 5, 0]])
    g = RNG.standard_normal((2, 3, 3))
    e.forward(ids)
    e.backward(g)
    want = np.zeros_like(e.weight.data)
    K.embedding_bwd_ref(ids.reshape(-1), g.reshape(-1, 3), want, 0)
    np.testing.assert_allclose(e.weight.grad, want)
    assert np.all(e.weight.grad[0] == 0) and np.allclose(e.weight.grad[3], g[0, 2] + g[1, 0])
    with pytest.raises(IndexError):
        e.forward(np.array([6]))


@pytest.mark.parametrize("ignore", [-100, 2])
def test_softmax_cross_entropy_gradient_and_ignore_index(ignore):
    loss = nn.SoftmaxCrossEntropy(ignore_index=ignore)
    logits = RNG.standard_normal((6, 4)) * 3
    t = np.array([0, 2, 3, 1, 2, 0])
    base = loss.forward(logits, t)
    d = loss.backward()
    probs, losses, count = K.softmax_xent_ref(logits, t, ignore)
    assert np.isclose(base, losses.sum() / count)
    num = np.zeros_like(logits)
    for i in np.ndindex(logits.shape):
        lp, lm = logits.copy(), logits.copy()
        lp[i] += 1e-6
        lm[i] -= 1e-6
        num[i] = (loss.forward(lp, t) - loss.forward(lm, t)) / 2e-6
    np.testing.assert_allclose(d, num, rtol=1e-6, atol=1e-9)
    if ignore == 2:
        assert np.all(d[t == 2] == 0)
    with pytest.raises(IndexError):
        loss.forward(logits, np.array([0, 1, 4, 0, 0, 0]))


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    loss = nn.SoftmaxCrossEntropy()
    v = loss.forward(np.array([[1000.0, 0.0], [-1000.0, 0.0]], np.float32), np.array([0, 1]))
    assert np.isfinite(v) and v < 1e-6


def test_mse_gradient():
    m = nn.MSE()
    p, t = RNG.standard_normal((3, 4)), RNG.standard_normal((3, 4))
    m.forward(p, t)
    np.testing.assert_allclose(m.backward(), 2 * (p - t) / p.size)


def test_dropout_mask_scaling_and_eval():
    d = nn.Dropout(0.25, rng=np.random.default_rng(1))
    x = np.ones((200, 50), np.float32)
    y = d.forward(x)
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)} and abs(y.mean() - 1) < 0.05
    g = RNG.standard_normal(x.shape).astype(np.float32)
    np.testing.assert_allclose(d.backward(g), g * y)  # same mask, same scale
    d.eval()
    assert d.forward(x) is x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_match_numpy_twins(dtype):
    x = RNG.standard_normal(1000).astype(dtype)
    y = np.empty_like(x)
    for fwd, ref in [(K.relu_fwd, lambda v: np.maximum(v, 0)), (K.gelu_fwd, K.gelu_ref),
                     (K.tanh_fwd, np.tanh), (K.sigmoid_fwd, K.sigmoid_ref)]:
        fwd(x, y)
        np.testing.assert_allclose(y, ref(x), rtol=1e-6 if dtype == np.float32 else 1e-12, atol=1e-7)
    a = RNG.standard_normal((7, 9)).astype(dtype)
    gamma, beta = RNG.standard_normal(9).astype(dtype), RNG.standard_normal(9).astype(dtype)
    out, xhat, rstd = np.empty_like(a), np.empty_like(a), np.empty(7, dtype)
    K.layernorm_fwd(a, gamma, beta, 1e-5, out, xhat, rstd)
    np.testing.assert_allclose(out, K.layernorm_ref(a, gamma, beta, 1e-5), rtol=1e-5, atol=1e-5)
    t = RNG.integers(0, 9, 7)
    probs, losses = np.empty_like(a), np.empty(7, dtype)
    n = K.softmax_xent_fwd(a, t, -100, probs, losses)
    p_ref, l_ref, n_ref = K.softmax_xent_ref(a.astype(np.float64), t, -100)
    assert n == n_ref
    np.testing.assert_allclose(probs, p_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(losses, l_ref, rtol=1e-5, atol=1e-6)


def test_parameter_names_are_stable_paths():
    m = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Sequential(nn.LayerNorm(3), nn.Linear(3, 1)))
    assert [p.name for p in m.parameters()] == ["layers.0.weight", "layers.0.bias", "layers.2.layers.0.weight",
                                                "layers.2.layers.0.bias", "layers.2.layers.1.weight",
                                                "layers.2.layers.1.bias"]
    sd = m.state_dict()
    m2 = nn.Sequential(nn.Linear(2, 3, rng=np.random.default_rng(5)), nn.ReLU(),
                       nn.Sequential(nn.LayerNorm(3), nn.Linear(3, 1)))
    m2.load_state_dict(sd)
    assert all(np.array_equal(a.data, b.data) for a, b in zip(m.parameters(), m2.parameters()))


def _lstm_loss(m, x, h0, c0, lengths, g, gh, gc):
    y = m.forward(x, h0, c0, lengths)
    h, c = m.state
    return float(np.sum(y * g) + np.sum(h * gh) + np.sum(c * gc))


@pytest.mark.parametrize("lengths", [None, np.array([4, 2, 0])])
def test_lstm_gradients_match_finite_differences(lengths):
    """Input, parameter, initial-state grads of L = <y, g> + <h_n, gh> + <c_n, gc> (float64),
    with and without padded rows (a row of length 0 must pass its initial state straight through)."""
    m = nn.LSTM(3, 4, rng=np.random.default_rng(2), dtype=np.float64)
    n_b, n_t = 3, 4
    x, h0, c0 = RNG.standard_normal((n_b, n_t, 3)), RNG.standard_normal((n_b, 4)), RNG.standard_normal((n_b, 4))
    g, gh, gc = RNG.standard_normal((n_b, n_t, 4)), RNG.standard_normal((n_b, 4)), RNG.standard_normal((n_b, 4))
    m.forward(x, h0, c0, lengths)
    dx = m.backward(g.copy(), gh, gc)
    dh0, dc0 = m.dstate
    for arr, ana, name in [(x, dx, "x"), (h0, dh0, "h0"), (c0, dc0, "c0")] + \
            [(p.data, p.grad, p.name) for p in m.parameters()]:
        num = numeric_grad(lambda: _lstm_loss(m, x, h0, c0, lengths, g, gh, gc), arr)
        np.testing.assert_allclose(ana, num, rtol=1e-6, atol=1e-8, err_msg=name)
    if lengths is not None:
        m.forward(x, h0, c0, lengths)
        np.testing.assert_array_equal(m.state[0][2], h0[2])  # length 0: state untouched


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lstm_kernel_matches_numpy_step(dtype):
    n_b, n_h = 5, 7
    gates = (RNG.standard_normal((n_b, 4 * n_h)) * 2).astype(dtype)
    c_prev, h_prev = RNG.standard_normal((n_b, n_h)).astype(dtype), RNG.standard_normal((n_b, n_h)).astype(dtype)
    acts_ref, c_ref, h_ref = K.lstm_cell_ref(gates.astype(np.float64), c_prev.astype(np.float64))
    acts, c, h, tc = gates.copy(), np.empty_like(c_prev), np.empty_like(c_prev), np.empty_like(c_prev)
    K.lstm_cell_fwd(acts, c_prev, h_prev, np.ones(n_b, np.uint8), c, h, tc)
    tol = 1e-6 if dtype == np.float32 else 1e-13
    for a, b in [(acts, acts_ref), (c, c_ref), (h, h_ref)]:
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_lstm_float32_default_and_bad_input():
    m = nn.LSTM(3, 4)
    y = m.forward(np.zeros((2, 5, 3), np.float32))
    assert y.shape == (2, 5, 4) and y.dtype == np.float32 and m.bias.data[4:8].tolist() == [1.0] * 4
    with pytest.raises(ValueError, match="input size 3"):
        m.forward(np.zeros((2, 5, 6), np.float32))
    with pytest.raises(ValueError, match="lengths"):
        m.forward(np.zeros((2, 5, 3), np.float32), lengths=np.array([6, 1]))


def test_first_layer_may_skip_its_input_grad_but_no_other_layer():
    x, g = RNG.standard_normal((4, 3)), RNG.standard_normal((4, 2))
    full = nn.Sequential(nn.Linear(3, 5, dtype=np.float64), nn.ReLU(), nn.Linear(5, 2, dtype=np.float64))
    skip = nn.Sequential(nn.Linear(3, 5, dtype=np.float64, input_grad=False), nn.ReLU(), nn.Linear(5, 2, dtype=np.float64))
    full.forward(x)
    assert full.backward(g).shape == x.shape
    skip.forward(x)
    assert skip.backward(g) is None
    for a, b in zip(full.parameters(), skip.parameters()):
        np.testing.assert_array_equal(a.grad, b.grad)  # the parameter grads do not change
    bad = nn.Sequential(nn.Linear(3, 5, dtype=np.float64), nn.Linear(5, 2, dtype=np.float64, input_grad=False))
    bad.forward(x)
    with pytest.raises(ValueError, match="not the first layer"):
        bad.backward(g)


@pytest.mark.parametrize("padding_idx,row", [(-1, 5), (-6, 0), (4, 4)])
def test_embedding_negative_padding_idx_counts_from_the_end(padding_idx, row):
    """Like PyTorch: -1 is the last row. That row is zero and its gradient stays zero whatever the
    ids (it was zeroed but kept receiving gradient, since -1 also meant "no padding" internally);
    the other rows' gradients match finite differences."""
    e = nn.Embedding(6, 3, padding_idx=padding_idx, dtype=np.float64)
    assert e.padding_idx == row and np.all(e.weight.data[row] == 0)
    ids = np.array([[1, 5, 3], [0, 5, 4]])
    g = RNG.standard_normal((2, 3, 3))
    e.weight.grad[...] = 0
    e.forward(ids)
    e.backward(g)
    assert np.all(e.weight.grad[row] == 0)
    num = numeric_grad(lambda: float(np.sum(e.forward(ids) * g)), e.weight.data)
    num[row] = 0
    np.testing.assert_allclose(e.weight.grad, num, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("padding_idx,err", [(6, ValueError), (-7, ValueError), (1.5, TypeError)])
def test_embedding_padding_idx_out_of_range_is_explained(padding_idx, err):
    with pytest.raises(err, match="padding_idx"):
        nn.Embedding(6, 3, padding_idx=padding_idx)


def test_module_zero_grad_clears_row_sparse_and_skips_freed_stand_ins():
    """model.zero_grad() clears a row-sparse gradient (it has no .flags) and leaves a sharded
    DataParallel's read-only freed gradient alone."""
    from disttrain.nn.module import Parameter
    from disttrain.nn.sparse import RowSparseGrad

    class Two(nn.Module):
        def __init__(self):
            self.table, self.freed = Parameter(np.ones((4, 2))), Parameter(np.ones(3))

    m = Two()
    m.table.grad = RowSparseGrad((4, 2), np.float64)
    m.table.grad.add_(np.array([1]), np.ones((1, 2)))
    m.freed.grad = np.broadcast_to(np.zeros(()), (3,))  # read-only, as parallel/zero.freed makes it
    m.zero_grad()
    assert m.table.grad.rows.size == 0


@pytest.mark.parametrize("fan_in,fan_out,batch", [(0, 3, 4), (3, 0, 4), (3, 2, 0), (0, 0, 0)])
def test_linear_with_zero_features_or_samples_is_an_empty_affine_map(fan_in, fan_out, batch):
    """Zero-size dimensions are legal shapes (a tensor-parallel shard can be empty): y = b, the
    bias gradient is the sum of dy, every other gradient is empty or zero."""
    lin = nn.Linear(fan_in, fan_out, dtype=np.float64)
    lin.bias.data[...] = np.arange(fan_out)
    x = np.ones((batch, 2, fan_in))
    y = lin.forward(x)
    assert y.shape == (batch, 2, fan_out) and np.array_equal(y, np.broadcast_to(lin.bias.data, y.shape))
    dx = lin.backward(np.full(y.shape, 0.5))
    assert dx.shape == x.shape and not dx.any()
    assert lin.weight.grad.shape == (fan_in, fan_out) and not lin.weight.grad.any()
    np.testing.assert_array_equal(lin.bias.grad, np.full(fan_out, batch * 2 * 0.5))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k,m,n", [(128, 784, 1024), (5, 3, 7), (0, 4, 6), (6, 0, 3), (1, 1, 1)])
def test_add_at_b_accumulates_like_numpy(dtype, k, m, n):
    """nn/blas.py: c += a.T @ b in one GEMM (beta = 1) agrees with NumPy's product-then-sum; the
    fallback (strided operands, mixed dtypes) is NumPy's own expression."""
    rng = np.random.default_rng(k + m + n)
    a, b = rng.standard_normal((k, m)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)
    c0 = rng.standard_normal((m, n)).astype(dtype)
    c, ref = c0.copy(), c0 + a.T @ b
    blas.add_at_b(c, a, b)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(c, ref, rtol=tol, atol=tol * max(1, k))
    assert not np.array_equal(c, c0) or min(k, m, n) == 0  # it did add something
    strided = np.asfortranarray(a)  # not C-contiguous: the NumPy path, bit for bit
    c2 = c0.copy()
    blas.add_at_b(c2, strided, b)
    np.testing.assert_array_equal(c2, ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_add_at_b_with_c_overlapping_an_input_is_numpys_answer(dtype):
    """attack5: GEMM must not write C while it reads A or B; c overlapping a (the same array, or a
    shifted view of one buffer) went through the GEMM and came back with wrong sums (errors of
    3-9 on 5 x 5 standard normals). NumPy's expression makes the product first."""
    rng = np.random.default_rng(5)
    buf = rng.standard_normal(64).astype(dtype)
    b = rng.standard_normal((5, 5)).astype(dtype)
    for a_view, c_view in ((slice(0, 25), slice(0, 25)), (slice(0, 25), slice(5, 30))):
        a, c = buf[a_view].reshape(5, 5), buf[c_view].reshape(5, 5)
        want = c + a.T @ b  # NumPy: a temporary product, then the sum
        blas.add_at_b(c, a, b)
        np.testing.assert_array_equal(c, want)
        buf = rng.standard_normal(64).astype(dtype)
    c = rng.standard_normal((5, 5)).astype(dtype)
    a = rng.standard_normal((5, 5)).astype(dtype)
    want = c + a.T @ c
    blas.add_at_b(c, a, c)
    np.testing.assert_array_equal(c, want)


def test_add_at_b_is_used_by_linear_when_numpy_bundles_openblas():
    # a guard: where NumPy bundles OpenBLAS (its PyPI wheels) the one-GEMM path must load
    bundled = glob.glob(os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs",
                                     "libscipy_openblas64_*.so"))
    assert blas.AVAILABLE == bool(bundled)


def test_layers_and_losses_take_zero_rows():
    """A batch with no rows (an empty pipeline micro-batch, a replica at the ragged end of an
    epoch) gives empty outputs, empty input gradients and unchanged (zero) parameter gradients -
    it used to raise in LSTM / Embedding backward (reshape(-1) of zero rows) and MSE gave NaN."""
    for layer, x, width in ((nn.LSTM(3, 4, dtype=np.float64), np.zeros((0, 5, 3)), 4),
                            (nn.Embedding(7, 4, dtype=np.float64), np.zeros((0, 5), np.int64), 4),
                            (nn.Linear(3, 4, dtype=np.float64), np.zeros((0, 3)), 4)):
        for p in layer.parameters():
            p.grad = np.zeros_like(p.data)
        y = layer.forward(x)
        assert y.shape[0] == 0 and y.shape[-1] == width, (type(layer).__name__, y.shape)
        dx = layer.backward(np.zeros_like(y))
        assert dx is None or dx.shape == x.shape, (type(layer).__name__, dx.shape)
        assert all(not p.grad.any() for p in layer.parameters()), type(layer).__name__
    loss = nn.MSE()
    assert loss.forward(np.zeros((0, 2)), np.zeros((0, 2))) == 0.0
    assert loss.backward().shape == (0, 2)
