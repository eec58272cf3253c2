"""Numba kernels against their plain-NumPy twins (and IEEE/NumPy rounding, bit for bit)."""
import numpy as np
import pytest

from disttrain.comm import fused, node
from disttrain.comm import kernels as k
from disttrain.comm.ops import MAX, MIN, PROD, SUM

DTYPES = [np.float32, np.float64, np.int32, np.int64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", [SUM, PROD, MIN, MAX])
def test_reduce_matches_numpy(dtype, op):
    rng = np.random.default_rng(op)
    for n in (0, 1, 7, 1000, 65537):
        a = rng.integers(-3, 4, n).astype(dtype) if np.dtype(dtype).kind == "i" else rng.standard_normal(n).astype(dtype)
        b = rng.integers(-3, 4, n).astype(dtype) if np.dtype(dtype).kind == "i" else rng.standard_normal(n).astype(dtype)
        got, want = a.copy(), a.copy()
        k.reduce_into(got, b, op)
        k.reduce_into_ref(want, b, op)
        assert np.array_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_divide_matches_numpy(dtype):
    a = (np.arange(-50, 50) * 7).astype(dtype)
    for d in (1, 3, 8):
        got, want = a.copy(), a.copy()
        k.divide(got, d)
        k.divide_ref(want, d)
        assert np.array_equal(got, want)


def test_half_to_float_exact_for_all_65536_halves():
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    out = np.empty(h.size, np.float32)
    k.half_to_float(h, out)
    assert np.array_equal(out.view(np.uint32), h.astype(np.float32).view(np.uint32))


def test_float_to_half_rounds_like_numpy_bit_for_bit():
    rng = np.random.default_rng(0)
    random_bits = rng.integers(0, 2 ** 32, 2_000_000, dtype=np.uint64).astype(np.uint32)
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32).view(np.uint32)
    # every half value, and the singles just around each (ties to even, carries, subnormals, overflow)
    near = np.concatenate([halves + np.uint32(o) for o in (0, 1, 0xFFF, 0x1000, 0x1001)] + [halves - np.uint32(1)])
    f = np.concatenate([random_bits, near]).view(np.float32)
    got = np.empty(f.size, np.float16)
    k.float_to_half(f, got)
    with np.errstate(all="ignore"):
        want = f.astype(np.float16)
    bad = np.nonzero(got.view(np.uint16) != want.view(np.uint16))[0]
    assert bad.size == 0, [hex(v) for v in f.view(np.uint32)[bad[:5]]]


def test_pack_unpack_round_trip_and_match_reference():
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, 1000).astype(np.uint8)
    starts = np.array([0, 10, 500, 999, 400], np.int64)
    lengths = np.array([5, 0, 100, 1, 50], np.int64)
    got, want = np.empty(lengths.sum(), np.uint8), np.empty(lengths.sum(), np.uint8)
    k.pack(src, starts, lengths, got)
    k.pack_ref(src, starts, lengths, want)
    assert np.array_equal(got, want)
    back, back_ref = np.zeros_like(src), np.zeros_like(src)
    k.unpack(got, starts, lengths, back)
    k.unpack_ref(got, starts, lengths, back_ref)
    assert np.array_equal(back, back_ref)
    mask = np.zeros(src.size, bool)
    for s, n in zip(starts, lengths):
        mask[s:s + n] = True
    assert np.array_equal(back[mask], src[mask])


def test_the_node_state_faults_in_what_a_fused_round_can_use():
    """node.py faults in touched_bytes(p) of each slot when a communicator's node state is made:
    at least what one round of a fused allreduce carries (fused.chunk; else its first call pays
    the page faults), no more than the slot."""
    for p in range(2, 65):
        for item in (4, 8):
            assert 0 < fused.chunk(p, item) * item <= node.touched_bytes(p) <= node.SMALL, p
