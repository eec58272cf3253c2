"""Numba kernels of the gradient compressors: bf16 rounding, sparse scatter-add, sign bit packing.

``nogil=True`` so they run on the communication thread while backward computes on the main thread;
``cache=True`` so they compile once per machine. Each has a NumPy twin (``_ref``) for the tests.
"""
from __future__ import annotations

import numpy as np
from numba import njit

_JIT = dict(nogil=True, cache=True, boundscheck=False)


# ------------------------------------------------------------------------------------- bfloat16
@njit(**_JIT)
def _bf16_encode_bits(src, dst):
    # src: uint32 bits of float32; dst: uint16. Round to nearest, ties to even: add 0x7FFF plus the
    # lowest kept bit, then truncate (a carry into the exponent is the correct rounding up).
    for i in range(src.shape[0]):
        f = src[i]
        if (f & np.uint32(0x7F800000)) == np.uint32(0x7F800000) and (f & np.uint32(0x7FFFFF)) != 0:
            dst[i] = np.uint16((f >> np.uint32(16)) | np.uint32(0x40))  # NaN stays a (quiet) NaN
        else:
            dst[i] = np.uint16((f + np.uint32(0x7FFF) + ((f >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(**_JIT)
def _bf16_decode_bits(src, dst):
    for i in range(src.shape[0]):
        dst[i] = np.uint32(src[i]) << np.uint32(16)


def bf16_encode(src: np.ndarray, dst: np.ndarray) -> None:
    """dst (uint16 bfloat16 bits) = src (float32, 1-D) rounded to nearest even."""
    if src.shape[0]:
        _bf16_encode_bits(src.view(np.uint32), dst)


def bf16_decode(src: np.ndarray, dst: np.ndarray) -> None:
    """dst (float32, 1-D) = the bfloat16 values whose bits are in src (exact)."""
    if src.shape[0]:
        _bf16_decode_bits(src, dst.view(np.uint32))


def bf16_encode_ref(src: np.ndarray) -> np.ndarray:
    """Reference: the nearer of the two bfloat16 neighbours of each value, ties to the even one."""
    bits = src.astype(np.float32).view(np.uint32).astype(np.uint64)
    lo = bits >> 16
    rem = bits & 0xFFFF
    up = (rem > 0x8000) | ((rem == 0x8000) & (lo & 1 == 1))
    out = (lo + up).astype(np.uint16)
    nan = np.isnan(src)
    out[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return out


# ---------------------------------------------------------------------------------------- top-k
_RADIX = 11


@njit(**_JIT)
def _topk_bits(raw, absmask, nbits, k, idx, vals, acc):
    # Radix select on the magnitudes' bit patterns: for non-negative IEEE floats the unsigned bit
    # pattern orders like the value, so the k-th largest |x| is found digit by digit from the top
    # (11 bits per pass, one histogram each) - O(n), no sort, no index array. Only the first pass
    # reads every element; it keeps the candidates of the chosen digit for the later passes.
    n = raw.shape[0]
    hist = np.zeros(1 << _RADIX, np.int64)
    width = min(_RADIX, nbits)
    shift = nbits - width
    for i in range(n):
        hist[(raw[i] & absmask) >> shift] += 1
    d = (1 << width) - 1
    need = k  # how many elements equal to the threshold's prefix are still to be taken
    while hist[d] < need:  # digits above d hold fewer than `need`: take them all, go down a digit
        need -= hist[d]
        d -= 1
    prefix = raw.dtype.type(d) << shift
    cand = np.empty(hist[d], raw.dtype)
    c = 0
    for i in range(n):
        b = raw[i] & absmask
        if (b >> shift) == d:
            cand[c] = b
            c += 1
    while shift > 0:
        width = min(_RADIX, shift)
        shift -= width
        hist[:] = 0
        dmask = (1 << width) - 1
        for i in range(c):
            hist[(cand[i] >> shift) & dmask] += 1
        d = dmask
        while hist[d] < need:
            need -= hist[d]
            d -= 1
        prefix |= raw.dtype.type(d) << shift
        c2 = 0
        for i in range(c):
            if ((cand[i] >> shift) & dmask) == d:
                cand[c2] = cand[i]
                c2 += 1
        c = c2
    # prefix is now the k-th largest magnitude's bit pattern; take `need` of its equals
    j = 0
    for i in range(n):
        b = raw[i] & absmask
        if b > prefix or (b == prefix and need > 0):
            if b == prefix:
                need -= 1
            idx[j] = i
            vals[j] = acc[i]
            acc[i] = 0
            j += 1


def topk_select(acc: np.ndarray, k: int, idx: np.ndarray, vals: np.ndarray) -> None:
    """Move the k entries of largest magnitude out of acc (float32/float64, 1-D): their indices
    (ascending; equal magnitudes at the threshold taken lowest index first) into idx (int32),
    their values into vals, zeros left in their place. NaN counts as larger than any number."""
    if k <= 0:
        return
    if acc.dtype == np.float32:
        _topk_bits(acc.view(np.uint32), np.uint32(0x7FFFFFFF), 31, k, idx, vals, acc)
    else:
        _topk_bits(acc.view(np.uint64), np.uint64(0x7FFFFFFFFFFFFFFF), 63, k, idx, vals, acc)


def topk_select_ref(acc: np.ndarray, k: int) -> np.ndarray:
    """Reference: the indices of the k largest |acc| (sorted), by a stable full sort."""
    return np.sort(np.argsort(-np.abs(acc), kind="stable")[:k])


@njit(**_JIT)
def scatter_add(dst, idx, vals):
    """dst[idx[j]] += vals[j] for every j (indices may repeat)."""
    for j in range(idx.shape[0]):
        dst[idx[j]] += vals[j]


def scatter_add_ref(dst, idx, vals) -> None:
    np.add.at(dst, idx, vals)


# ---------------------------------------------------------------------------------- scaled sign
@njit(**_JIT)
def sign_compress(acc, starts, lengths, scales, words):
    """Scaled sign with error feedback, in place (Karimireddy et al. 2019, EF-SignSGD).

    For each segment s: scale = mean |acc| over it; bit i of the packed words is 1 where
    acc >= 0; then acc becomes the residual acc - scale * sign(acc), i.e. what was not sent.
    Bits are packed 32 per uint32 word over the whole buffer (bit i in word i // 32, position i % 32).
    Segments must be sorted, disjoint and cover the buffer.
    """
    for s in range(starts.shape[0]):
        a, n = starts[s], lengths[s]
        total = 0.0
        for i in range(a, a + n):
            total += abs(acc[i])
        scales[s] = total / n if n > 0 else 0.0  # rounded to the payload's dtype: what receivers use
    n = acc.shape[0]
    s, end = -1, 0
    scale = acc.dtype.type(0)
    for w in range(words.shape[0]):  # one word at a time in a register, not 32 read-modify-writes
        word = np.uint32(0)
        for i in range(32 * w, min(32 * w + 32, n)):
            while i >= end:  # entered the next segment
                s += 1
                end = starts[s] + lengths[s]
                scale = acc.dtype.type(scales[s])
            pos = acc[i] >= 0  # branch-free: random signs would mispredict half the time
            word |= np.uint32(pos) << np.uint32(i & 31)
            acc[i] -= (acc.dtype.type(2 * pos) - 1) * scale
        words[w] = word


@njit(**_JIT)
def sign_accumulate(words, scales, starts, lengths, dst):
    """dst += scale_s * (+1 where the bit is set, -1 where not), per segment s."""
    for s in range(starts.shape[0]):
        a, n = starts[s], lengths[s]
        sc = scales[s]
        for i in range(a, a + n):  # branch-free, as in sign_compress
            bit = (words[i >> 5] >> np.uint32(i & 31)) & np.uint32(1)
            dst[i] += (dst.dtype.type(2 * bit) - 1) * sc


def sign_pack_ref(x: np.ndarray) -> np.ndarray:
    """Reference packing: bit i of word i // 32 is (x[i] >= 0)."""
    bits = np.zeros(-(-x.shape[0] // 32) * 32, np.uint64)
    bits[:x.shape[0]] = x >= 0
    return (bits.reshape(-1, 32) << np.arange(32, dtype=np.uint64)).sum(axis=1).astype(np.uint32)


def sign_unpack_ref(words: np.ndarray, n: int) -> np.ndarray:
    """Reference unpacking: +1.0 / -1.0 per bit, n values."""
    bits = (words.astype(np.uint64)[:, None] >> np.arange(32, dtype=np.uint64)) & 1
    return np.where(bits.reshape(-1)[:n] == 1, 1.0, -1.0)


def warmup() -> None:
    """Compile (or load from the cache) the specializations DataParallel uses."""
    for t in (np.float32, np.float64):
        a = np.ones(40, t)
        scatter_add(a, np.array([1], np.int32), np.ones(1, t))
        st, ln = np.array([0], np.int64), np.array([40], np.int64)
        w, sc = np.zeros(2, np.uint32), np.zeros(1, t)
        sign_compress(a, st, ln, sc, w)
        sign_accumulate(w, sc, st, ln, a)
    for t in (np.float32, np.float64):
        topk_select(np.ones(4, t), 2, np.zeros(2, np.int32), np.zeros(2, t))
    bf16_encode(np.ones(2, np.float32), np.zeros(2, np.uint16))
    bf16_decode(np.ones(2, np.uint16), np.zeros(2, np.float32))
