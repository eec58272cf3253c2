"""Counter-based table initialisation, row-sparse gradients and the sparse optimizers (one process):
kernels against their NumPy twins, lazy Adam against a NumPy reference written from its definition,
and the sparse == dense identities (plain SGD, row-wise Adagrad, lazy Adam when every row is touched)."""
import tracemalloc

import numpy as np
import pytest

from disttrain import numerics, optim
from disttrain.nn.sparse import RowSparseGrad, coalesce
from disttrain.optim import rowwise as R
from disttrain.parallel.embedding import LocalEmbeddings
from disttrain.parallel.embedding_init import BLOCK_ROWS, table_rows

SIZES = (9, 4, 6)


# ------------------------------------------------------------------------------ initialisation
@pytest.mark.parametrize("dim", [1, 3, 8])
def test_any_row_range_is_the_same_slice_of_the_table(dim):
    n = 2 * BLOCK_ROWS + 17  # three blocks, the last one partial
    full = table_rows(5, 1, n, 0, n, dim, np.float64)
    for lo, hi in [(0, 0), (0, 1), (1, 2), (3, 10), (BLOCK_ROWS - 1, BLOCK_ROWS + 1), (BLOCK_ROWS, 2 * BLOCK_ROWS),
                   (7, n), (n - 1, n), (n, n)]:
        np.testing.assert_array_equal(table_rows(5, 1, n, lo, hi, dim, np.float64), full[lo:hi])
    bound = 1 / np.sqrt(n)
    assert np.abs(full).max() <= bound and np.abs(full).max() > 0.99 * bound
    assert abs(full.mean()) < 0.05 * bound  # uniform and symmetric, not a constant or a shifted draw
    # another table, another seed: other values
    assert not np.array_equal(full[:5], table_rows(5, 2, n, 0, 5, dim, np.float64))
    assert not np.array_equal(full[:5], table_rows(6, 1, n, 0, 5, dim, np.float64))
    np.testing.assert_array_equal(table_rows(5, 1, n, 3, 9, dim, np.float32), full[3:9].astype(np.float32))


def test_drawing_rows_allocates_one_block_not_the_table():
    n, dim = 20 * BLOCK_ROWS, 4
    out = np.empty((n - 5, dim))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        table_rows(1, 0, n, 5, n, dim, np.float64, out=out)
        extra = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert extra <= BLOCK_ROWS * dim * 8 + 64 * 1024, extra  # one block of temporaries (+ generator objects)


def test_bad_row_ranges_are_refused():
    with pytest.raises(ValueError, match="not inside"):
        table_rows(0, 0, 10, 4, 11, 2)
    with pytest.raises(ValueError, match="out has shape"):
        table_rows(0, 0, 10, 0, 4, 2, out=np.empty((3, 2)))


def test_local_embeddings_seed_and_rng():
    a = LocalEmbeddings(SIZES, 3, seed=4, dtype=np.float64)
    for t, n in enumerate(SIZES):
        np.testing.assert_array_equal(a.tables()[t].data, table_rows(4, t, n, 0, n, 3, np.float64))
    b = LocalEmbeddings(SIZES, 3, rng=np.random.default_rng(2), dtype=np.float64)
    c = LocalEmbeddings(SIZES, 3, rng=np.random.default_rng(2), dtype=np.float64)
    np.testing.assert_array_equal(b.table0.data, c.table0.data)
    assert not np.array_equal(a.table0.data, b.table0.data)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="non-negative integer"):
            LocalEmbeddings(SIZES, 3, seed=bad)


# ------------------------------------------------------------------------ row-sparse gradients
def test_row_sparse_gradient_accumulates_like_a_dense_scatter_add():
    rng = np.random.default_rng(0)
    g, dense = RowSparseGrad((7, 3), np.float64), np.zeros((7, 3))
    for k in (5, 0, 9):  # several backward passes accumulate, an empty one included
        rows, vals = rng.integers(0, 7, k), rng.standard_normal((k, 3))
        g.add_(rows, vals)
        np.add.at(dense, rows, vals)
    assert np.all(np.diff(g.rows) > 0)
    np.testing.assert_array_equal(g.to_dense(), dense)
    g[...] = 0
    assert g.nnz_rows == 0 and not g.to_dense().any()
    with pytest.raises(TypeError, match="cleared"):
        g[1] = 0
    with pytest.raises(ValueError, match="must have shape"):
        g.add_([1, 2], np.ones((2, 4)))
    with pytest.raises(IndexError, match=r"\[0, 7\)"):
        g.add_([7], np.ones((1, 3)))
    rows, vals = coalesce(np.array([3, 1, 3, 3]), np.array([[1.0], [2.0], [4.0], [8.0]]))
    np.testing.assert_array_equal(rows, [1, 3])
    np.testing.assert_array_equal(vals, [[2.0], [13.0]])


def test_nonfinite_row_sparse_gradient_is_detected():
    g = RowSparseGrad((4, 2), np.float64)
    g.add_([2], np.array([[1.0, np.nan]]))
    assert not numerics.all_finite([g])
    g[...] = 0
    assert numerics.all_finite([g])


# --------------------------------------------------------------------- kernels vs NumPy twins
def _case(dtype, rows=(0, 3, 4, 9)):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((10, 5)).astype(dtype)
    rows = np.array(rows, np.int64)
    g = rng.standard_normal((len(rows), 5)).astype(dtype)
    return w, rows, g, rng


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows", [(0, 3, 4, 9), ()])
@pytest.mark.parametrize("momentum,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 0.01), (0.9, True, 0.0)])
def test_sgd_rows_kernel_matches_numpy_twin(dtype, rows, momentum, nesterov, wd):
    w, rows, g, rng = _case(dtype, rows)
    v = rng.standard_normal(w.shape).astype(dtype)
    w2, v2 = w.copy(), v.copy()
    f = np.dtype(dtype).type
    for _ in range(2):
        R.sgd_rows(w, rows, g, v, f(0.1), f(momentum), f(wd), nesterov)
        R.sgd_rows_ref(w2, rows, g, v2, f(0.1), f(momentum), f(wd), nesterov)
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(w, w2, rtol=tol, atol=tol)
    np.testing.assert_allclose(v, v2, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("wd,decoupled", [(0.0, False), (0.1, False), (0.1, True)])
def test_adam_rows_kernel_matches_numpy_twin(dtype, wd, decoupled):
    w, rows, g, rng = _case(dtype)
    m, v = rng.standard_normal(w.shape).astype(dtype), rng.random(w.shape).astype(dtype)
    w2, m2, v2 = w.copy(), m.copy(), v.copy()
    f = np.dtype(dtype).type
    args = (f(0.01), f(0.9), f(0.999), f(1e-8), f(wd), decoupled, f(1 - 0.9 ** 3), f(1 - 0.999 ** 3))
    R.adam_rows(w, rows, g, m, v, *args)
    R.adam_rows_ref(w2, rows, g, m2, v2, *args)
    tol = 1e-5 if dtype == np.float32 else 1e-13
    for a, b in ((w, w2), (m, m2), (v, v2)):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adagrad_rows_kernel_matches_numpy_twin(dtype, wd):
    w, rows, g, rng = _case(dtype)
    s = rng.random((10, 1)).astype(dtype)
    w2, s2 = w.copy(), s.copy()
    f = np.dtype(dtype).type
    R.adagrad_rows(w, rows, g, s, f(0.1), f(1e-8), f(wd))
    R.adagrad_rows_ref(w2, rows, g, s2, f(0.1), f(1e-8), f(wd))
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(w, w2, rtol=tol, atol=tol)
    np.testing.assert_allclose(s, s2, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------- optimizer semantics
def _batches(steps=5, batch=6, seed=3, sizes=SIZES, all_rows=False):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        if all_rows:  # every row of every table looked up at least once
            ids = np.stack([np.resize(rng.permutation(n), max(sizes)) for n in sizes], axis=1)
        else:
            ids = np.stack([rng.integers(0, max(1, n // 2), batch) for n in sizes], axis=1)  # upper half never
        out.append((ids, rng.standard_normal((len(ids), len(sizes), 3))))
    return out


def _train(sparse, make_opt, batches, sizes=SIZES):
    emb = LocalEmbeddings(sizes, 3, seed=7, dtype=np.float64, sparse=sparse)
    opt = make_opt(emb.parameters())
    for ids, dy in batches:
        emb.forward(ids)
        emb.backward(dy)
        opt.step()
        opt.zero_grad()
    return emb, opt


@pytest.mark.parametrize("cls", [optim.SGD, optim.RowWiseAdagrad])
def test_plain_sgd_and_rowwise_adagrad_are_identical_sparse_or_dense(cls):
    """Untouched rows have a zero gradient, which moves neither (no momentum, no weight decay)."""
    batches = _batches()
    dense, _ = _train(False, lambda p: cls(p, lr=0.3), batches)
    sparse, opt = _train(True, lambda p: cls(p, lr=0.3), batches)
    for a, b in zip(dense.tables(), sparse.tables()):
        np.testing.assert_array_equal(a.data, b.data)
    if cls is optim.RowWiseAdagrad:
        assert opt.state["table0"]["row_sum"].shape == (SIZES[0], 1)


def test_momentum_sgd_is_lazy_untouched_rows_keep_weights_and_momentum():
    batches = _batches()
    emb, opt = _train(True, lambda p: optim.SGD(p, lr=0.3, momentum=0.9), batches[:2])
    before = {t.name: (t.data.copy(), opt.state[t.name]["momentum"].copy()) for t in emb.tables()}
    ids, dy = batches[2]
    ids = ids.copy()
    ids[:, 0] = 0  # table0: only row 0 this step
    emb.forward(ids)
    emb.backward(dy)
    opt.step()
    w0, v0 = before["table0"]
    w, v = emb.table0.data, opt.state["table0"]["momentum"]
    np.testing.assert_array_equal(w[1:], w0[1:])
    np.testing.assert_array_equal(v[1:], v0[1:])
    g = dy[:, 0].sum(axis=0)
    np.testing.assert_allclose(v[0], 0.9 * v0[0] + g, rtol=1e-14)
    np.testing.assert_allclose(w[0], w0[0] - 0.3 * v[0], rtol=1e-14)
    assert np.abs(v0[1:4]).max() > 0  # rows with momentum exist: dense SGD would have moved them


def lazy_adam_reference(w, steps, lr, b1, b2, eps):
    """Lazy Adam written from its definition, one row at a time: steps = [(rows, grads)]."""
    w = w.copy()
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, (rows, grads) in enumerate(steps, start=1):
        for r, g in zip(rows, grads):
            m[r] = b1 * m[r] + (1 - b1) * g
            v[r] = b2 * v[r] + (1 - b2) * g ** 2
            w[r] = w[r] - lr * (m[r] / (1 - b1 ** t)) / (np.sqrt(v[r] / (1 - b2 ** t)) + eps)
    return w, m, v


def test_lazy_adam_matches_a_numpy_reference_on_a_tiny_table():
    sizes = (6,)
    rng = np.random.default_rng(11)
    steps = [np.array([[1], [4], [1]]), np.array([[2], [2]]), np.array([[5]]), np.zeros((0, 1), np.int64),
             np.array([[1], [5], [0]])]  # row 3 is never touched; step 4 touches nothing
    dys = [rng.standard_normal((len(ids), 1, 3)) for ids in steps]
    emb = LocalEmbeddings(sizes, 3, seed=1, dtype=np.float64, sparse=True)
    w0 = emb.table0.data.copy()
    opt = optim.Adam(emb.parameters(), lr=0.05, betas=(0.8, 0.99), eps=1e-6)
    for ids, dy in zip(steps, dys):
        emb.forward(ids)
        emb.backward(dy)
        opt.step()
        opt.zero_grad()
    # the reference's own gradients: each looked-up row's summed upstream gradient
    ref_steps = [(np.unique(ids[:, 0]), [dy[ids[:, 0] == r, 0].sum(axis=0) for r in np.unique(ids[:, 0])])
                 for ids, dy in zip(steps, dys)]
    w, m, v = lazy_adam_reference(w0, ref_steps, 0.05, 0.8, 0.99, 1e-6)
    np.testing.assert_allclose(emb.table0.data, w, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(opt.state["table0"]["m"], m, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(opt.state["table0"]["v"], v, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(emb.table0.data[3], w0[3])  # never touched: never moved
    assert opt.steps == 5 and not np.array_equal(emb.table0.data[1], w0[1])


@pytest.mark.parametrize("cls,kw", [(optim.Adam, {}), (optim.Adam, dict(weight_decay=0.1)), (optim.AdamW, {})])
def test_lazy_adam_is_dense_adam_when_every_row_is_touched(cls, kw):
    batches = _batches(all_rows=True)
    dense, _ = _train(False, lambda p: cls(p, lr=0.05, **kw), batches)
    sparse, _ = _train(True, lambda p: cls(p, lr=0.05, **kw), batches)
    for a, b in zip(dense.tables(), sparse.tables()):
        np.testing.assert_allclose(b.data, a.data, rtol=1e-12, atol=1e-15)


def test_lazy_adam_differs_from_dense_adam_when_rows_are_skipped():
    """The semantics really are lazy (the oracle tests would not notice if both sides were dense)."""
    batches = _batches()
    dense, _ = _train(False, lambda p: optim.Adam(p, lr=0.05), batches)
    sparse, _ = _train(True, lambda p: optim.Adam(p, lr=0.05), batches)
    assert not np.allclose(dense.table0.data, sparse.table0.data)


def test_optimizers_without_sparse_updates_refuse_row_sparse_gradients():
    emb = LocalEmbeddings(SIZES, 3, seed=0, sparse=True)
    with pytest.raises(ValueError, match="LAMB cannot apply the row-sparse gradients of"):
        optim.LAMB(emb.parameters())
