"""Gradient compressors, one process: rounding bounds, exact selection, packing, low-rank
reconstruction, and the error-feedback invariant. (Across ranks: tests/mpi/test_compression.py.)"""
import numpy as np
import pytest

from disttrain import compression as Z
from disttrain.compression import kernels as K


def spread(rng, n, dtype=np.float32, lo=-6, hi=3):
    """Values of both signs over many orders of magnitude."""
    return (rng.standard_normal(n) * 10.0 ** rng.uniform(lo, hi, n)).astype(dtype)


# ------------------------------------------------------------------------------------ registry
def test_make_and_names():
    assert Z.make(None).name == "none" and Z.make("none").name == "none"
    assert Z.make("topk:0.05").ratio == 0.05 and Z.make("topk").ratio == 0.01
    assert Z.make("powersgd:4").rank == 4 and Z.make("powersgd").rank == 2
    c = Z.OneBit()
    assert Z.make(c) is c
    assert {"none", "fp16", "bf16", "onebit", "topk:RATIO", "powersgd:RANK"} <= set(Z.names())
    for s in ("topk:0.01", "powersgd:3", "fp16", "bf16", "onebit", "none"):
        assert Z.make(Z.make(s).spec).spec == s


@pytest.mark.parametrize("spec,msg", [("gzip", "unknown compression"), ("topk:0", "ratio"), ("topk:2", "ratio"),
                                      ("topk:x", "topk:x"), ("powersgd:0", "rank"), ("fp16:3", "no parameter"),
                                      (3, "name or a Compressor")])
def test_bad_specs_are_explained(spec, msg):
    with pytest.raises(ValueError, match=msg):
        Z.make(spec)


# ------------------------------------------------------------------------------------ fp16/bf16
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fp16_rounding_within_half_an_ulp_after_scaling(dtype):
    rng = np.random.default_rng(0)
    x = spread(rng, 20000, dtype, lo=-3, hi=6)  # up to ~1e6: overflows fp16 without the scale
    c = Z.FP16()
    payload, ctx = c.compress(x)
    assert payload.dtype == np.uint16 and payload.nbytes == x.size * 2
    y = c.decompress(payload, ctx)
    assert y.dtype == dtype and np.all(np.isfinite(y))
    scale = ctx[2]
    assert scale == 2.0 ** np.round(np.log2(scale)) and np.abs(x).max() * scale <= 65504
    # normal fp16 range: relative error <= 2^-11; below it, absolute error <= half the subnormal step
    err = np.abs(y.astype(np.float64) - x)
    normal = np.abs(x) * scale >= 2.0 ** -14
    assert np.all(err[normal] <= 2.0 ** -11 * np.abs(x[normal]) * (1 + 1e-6))
    assert np.all(err[~normal] <= 2.0 ** -25 / scale * (1 + 1e-6))


def test_fp16_matches_numpy_rounding_without_scale():
    x = np.array([1.0, 1 + 2 ** -11, 1 + 3 * 2 ** -11, -2.5, 0.0, 1e-8, 65504.0], np.float32)
    payload, ctx = Z.FP16().compress(x / 65504.0 * 32768)  # scale 1: max already in [32768, 65504]
    assert ctx[2] == 1.0
    assert np.array_equal(payload, (x / 65504.0 * 32768).astype(np.float16).view(np.uint16))


def test_bf16_round_to_nearest_even_on_every_kind_of_value():
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2 ** 32, 200000, dtype=np.uint64).astype(np.uint32)
    ties = (rng.integers(0, 2 ** 16, 1000, dtype=np.uint64).astype(np.uint32) << 16) | 0x8000  # exact ties
    special = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0x00000001,
                        0x7F7FFFFF, 0x3F808000, 0x3F818000], np.uint32)
    x = np.concatenate([bits, ties, special]).view(np.float32)
    got = np.empty(x.size, np.uint16)
    K.bf16_encode(x, got)
    assert np.array_equal(got, K.bf16_encode_ref(x))
    back = np.empty(x.size, np.float32)
    K.bf16_decode(got, back)
    assert np.array_equal(np.isnan(back), np.isnan(x))
    fin = np.isfinite(x) & np.isfinite(back) & (np.abs(x) >= 2.0 ** -126)
    assert np.all(np.abs(back[fin].astype(np.float64) - x[fin]) <= 2.0 ** -8 * np.abs(x[fin].astype(np.float64)))
    # ties go to the even neighbour: 1 + 2^-8 (halfway between 1 and 1 + 2^-7) -> 1
    K.bf16_encode(np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8], np.float32), got[:2])
    assert got[0] == 0x3F80 and got[1] == 0x3F82


# ---------------------------------------------------------------------------------------- top-k
@pytest.mark.parametrize("n,ratio", [(1, 0.01), (10, 0.01), (1000, 0.01), (1001, 0.1), (37, 1.0), (5000, 0.003)])
def test_topk_selects_exactly_the_k_largest_magnitudes(n, ratio):
    rng = np.random.default_rng(n)
    x = rng.permutation(np.linspace(1, 2, n) * rng.choice([-1, 1], n)).astype(np.float64)  # distinct |x|
    c = Z.TopK(ratio)
    payload, ctx = c.compress(x)
    k = ctx[2]
    assert k == max(1, int(ratio * n)) and payload.nbytes == k * 12
    y = c.decompress(payload, ctx)
    chosen = np.flatnonzero(y)
    assert np.array_equal(np.sort(chosen), np.sort(np.argsort(-np.abs(x))[:k]))
    assert np.array_equal(y[chosen], x[chosen])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_topk_radix_select_matches_a_full_sort_with_ties_and_specials(dtype):
    rng = np.random.default_rng(8)
    for n, k in [(1, 1), (2, 1), (100, 7), (4099, 41), (20000, 20000), (3000, 1500)]:
        x = rng.standard_normal(n).astype(dtype)
        x[::5] = x[min(3, n - 1)]  # many equal magnitudes (and at the threshold)
        x[1::9] = -x[1::9]
        if n > 100:
            x[10:20] = 0.0
            x[20] = np.inf
            x[21] = -np.finfo(dtype).tiny / 4  # a subnormal
        acc, idx, vals = x.copy(), np.empty(k, np.int32), np.empty(k, dtype)
        K.topk_select(acc, k, idx, vals)
        assert np.array_equal(idx, K.topk_select_ref(x, k)), (n, k)  # lowest index first among ties
        assert np.array_equal(vals, x[idx]) and np.all(acc[idx] == 0)
        keep = np.ones(n, bool)
        keep[idx] = False
        assert np.array_equal(acc[keep], x[keep])


def test_topk_sends_nan_first():
    x = np.ones(50, np.float32)
    x[17] = np.nan
    acc, idx, vals = x.copy(), np.empty(3, np.int32), np.empty(3, np.float32)
    K.topk_select(acc, 3, idx, vals)
    assert 17 in idx  # a NaN gradient must travel (and be caught by the non-finite check), not hide


def test_topk_zero_size():
    c = Z.TopK(0.5)
    payload, ctx = c.compress(np.zeros(0, np.float32))
    assert payload.nbytes == 0 and c.decompress(payload, ctx).shape == (0,)


def test_scatter_add_matches_numpy_with_repeated_indices():
    rng = np.random.default_rng(2)
    idx = rng.integers(0, 50, 400).astype(np.int32)
    vals = rng.standard_normal(400)
    a, b = np.zeros(50), np.zeros(50)
    K.scatter_add(a, idx, vals)
    K.scatter_add_ref(b, idx, vals)
    assert np.allclose(a, b, rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------------------------------- 1-bit
@pytest.mark.parametrize("n", [1, 31, 32, 33, 1000])
def test_onebit_packing_round_trips(n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    c = Z.OneBit()
    payload, ctx = c.compress(x.copy())
    words = payload[4:].view(np.uint32)
    assert words.shape == (-(-n // 32),)
    assert np.array_equal(words, K.sign_pack_ref(x))
    assert np.array_equal(K.sign_unpack_ref(words, n), np.where(x >= 0, 1.0, -1.0))
    scale = payload[:4].view(np.float32)[0]
    assert np.isclose(scale, np.abs(x).mean(), rtol=1e-6)
    assert np.allclose(c.decompress(payload, ctx), scale * np.where(x >= 0, 1, -1), rtol=0, atol=0)
    assert x.nbytes / payload.nbytes >= (25 if n >= 1000 else 0)


def test_onebit_scales_per_tensor():
    x = np.concatenate([np.full(40, 1e-3), np.full(24, -5.0)])
    c = Z.OneBit()
    payload, ctx = c.compress(x, layout=[(0, (40,)), (40, (4, 6))])
    y = c.decompress(payload, ctx)
    assert np.allclose(y[:40], 1e-3) and np.allclose(y[40:], -5.0)


# -------------------------------------------------------------------------------------- PowerSGD
@pytest.mark.parametrize("r,shape", [(1, (30, 20)), (2, (50, 17)), (4, (16, 64)), (2, (12, 5, 6))])
def test_powersgd_reconstructs_rank_r_matrices_exactly(r, shape):
    rng = np.random.default_rng(r)
    n, m = shape[0], int(np.prod(shape[1:]))
    M = (rng.standard_normal((n, r)) @ rng.standard_normal((r, m))).reshape(shape)
    c = Z.PowerSGD(r)
    payload, ctx = c.compress(M, key="w")
    assert sum(a.size for a in payload) == r * (n + m)
    assert np.allclose(c.decompress(payload, ctx), M, rtol=0, atol=1e-10 * np.abs(M).max())
    assert np.abs(c.state["w"]["residual"]).max() <= 1e-10 * np.abs(M).max()


def test_powersgd_sends_vectors_and_small_matrices_exactly():
    rng = np.random.default_rng(3)
    bias, small = rng.standard_normal(7), rng.standard_normal((3, 3))  # 2 * (3 + 3) >= 9: not worth it
    big = rng.standard_normal((40, 30))
    buf = np.concatenate([bias, small.ravel(), big.ravel()])
    c = Z.PowerSGD(2)
    payload, ctx = c.compress(buf, layout=[(0, (7,)), (7, (3, 3)), (16, (40, 30))])
    y = c.decompress(payload, ctx)
    assert np.array_equal(y[:16], buf[:16])
    assert np.linalg.matrix_rank(y[16:].reshape(40, 30)) == 2


def test_powersgd_warm_start_converges_to_the_best_rank_r_approximation():
    # Repeating the compression of one fixed matrix is subspace iteration (the warm start keeps Q):
    # with error feedback off (fresh residual each time) the error approaches the SVD's optimum.
    rng = np.random.default_rng(4)
    U, _ = np.linalg.qr(rng.standard_normal((60, 60)))
    V, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    M = (U[:, :40] * 0.7 ** np.arange(40)) @ V.T
    c = Z.PowerSGD(2)
    for _ in range(30):
        c.state.get("w", {}).pop("residual", None)
        payload, ctx = c.compress(M, key="w")
    best = np.linalg.norm(M - (U[:, :2] * 0.7 ** np.arange(2)) @ V[:, :2].T)
    assert np.linalg.norm(M - c.decompress(payload, ctx)) <= best * (1 + 1e-6)


# ------------------------------------------------------------------------------ error feedback
@pytest.mark.parametrize("spec", ["topk:0.02", "onebit", "powersgd:1", "fp16", "bf16", "none"])
def test_error_feedback_accounting(spec):
    """transmitted + residual == accumulated raw gradient, step after step."""
    rng = np.random.default_rng(5)
    c = Z.make(spec)
    layout = [(0, (25, 16)), (400, (16,))]
    raw_sum, sent_sum = np.zeros(416), np.zeros(416)
    for _ in range(6):
        g = rng.standard_normal(416)
        raw_sum += g
        payload, ctx = c.compress(g, key="bucket", **({"layout": layout} if spec in ("onebit", "powersgd:1") else {}))
        sent_sum += c.decompress(payload, ctx)
    residual = c.state.get("bucket", {}).get("residual", np.zeros(416))
    if spec in ("fp16", "bf16", "none"):  # no memory: what is sent is the gradient up to rounding
        assert np.allclose(sent_sum, raw_sum, rtol=0, atol=6 * 2 ** -7 * np.abs(raw_sum).max())
    else:
        assert np.abs(residual).max() > 0  # something was held back ...
        assert np.allclose(sent_sum + residual, raw_sum, rtol=0, atol=1e-12)  # ... and nothing lost


def test_state_dict_round_trip():
    c = Z.PowerSGD(2)
    c.compress(np.random.default_rng(6).standard_normal((20, 10)), key="b0:w..b")
    d = c.state_dict()
    assert set(d) == {"b0:w..b/residual", "b0:w..b/q0"}
    c2 = Z.PowerSGD(2)
    c2.load_state_dict(d)
    assert all(np.array_equal(c2.state_dict()[k], v) for k, v in d.items())


def test_kernels_compile_and_cache():
    K.warmup()
    assert K.scatter_add.stats.cache_hits or K.scatter_add.stats.cache_misses


# ------------------------------------------------------------------- rollback of a skipped step
STATEFUL = ["topk:0.05", "onebit", "powersgd:2"]
LAYOUT = [(0, (25, 16)), (400, (16,))]


def _compress(c, g, key):
    kw = {"layout": LAYOUT} if c.name in ("onebit", "powersgd") else {}
    payload, ctx = c.compress(g, key=key, **kw)
    return c.decompress(payload, ctx)


@pytest.mark.parametrize("spec", STATEFUL + ["fp16", "bf16", "none"])
@pytest.mark.parametrize("explicit_commit", [True, False])
def test_rollback_forgets_a_nan_step_exactly(spec, explicit_commit):
    """finite steps, a step with NaN/inf then rollback, finite steps == the run without the bad step:
    same outputs, same state, bit for bit (the error-feedback residual and PowerSGD's warm-start Q
    would otherwise carry the NaN into every later step)."""
    rng = np.random.default_rng(11)
    good = [rng.standard_normal(416) for _ in range(6)]
    bad = good[0].copy()
    bad[[3, 401]] = np.nan, np.inf
    ref, c = Z.make(spec), Z.make(spec)
    for i, g in enumerate(good):
        want = _compress(ref, g, "b")
        if i == 3:
            assert not np.all(np.isfinite(_compress(c, bad, "b")))
            c.rollback()
        got = _compress(c, g, "b")
        assert np.array_equal(got, want), (spec, i)
        if explicit_commit:
            c.commit()
    assert np.all(np.isfinite(got))
    a, b = ref.state_dict(), c.state_dict()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("spec", STATEFUL)
def test_rollback_of_a_first_step_leaves_no_state(spec):
    c = Z.make(spec)
    _compress(c, np.full(416, np.nan), "b")
    c.rollback()
    assert c.state == {} and c.state_dict() == {}
    c.rollback()  # nothing open: a no-op
    assert c.state == {}


def test_rollback_covers_every_key_of_the_step_and_only_that_step():
    """A step touches several buckets; rollback restores all of them, and none of the steps before."""
    c = Z.TopK(0.1)
    rng = np.random.default_rng(12)
    for _ in range(2):
        for key in ("b0", "b1"):
            c.compress(rng.standard_normal(50), key=key)
    before = c.state_dict()
    for key in ("b0", "b1"):  # the second touch of b0 begins a new step: the previous one is committed
        c.compress(np.full(50, np.nan), key=key)
    c.rollback()
    after = c.state_dict()
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("spec", STATEFUL)
def test_double_buffering_allocates_no_state_per_step(spec):
    """The cost of rollback: two buffers per state array, reused - not a copy per step."""
    c = Z.make(spec)
    rng = np.random.default_rng(13)
    seen = {}  # id -> array: holding them keeps ids from being reused by later allocations
    for i in range(8):
        _compress(c, rng.standard_normal(416), "b")
        if i % 3 == 2:
            _compress(c, rng.standard_normal(416), "b")
            c.rollback()
        seen.update((id(a), a) for a in c.state["b"].values())
    names = len(c.state["b"])
    assert len(seen) <= 2 * names + (1 if spec.startswith("powersgd") else 0)  # + the seeded first Q
