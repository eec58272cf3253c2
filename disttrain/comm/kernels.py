"""Numba kernels for the collectives' hot loops: reduce, scale, fp16 casts, byte pack/unpack.

Every kernel is ``nogil=True`` so that a communication thread (or another rank's progress) runs
while it computes, and ``cache=True`` so that compilation happens once per machine, not per job.
Each kernel has a plain-NumPy twin (suffix ``_ref``) that the tests compare it against.

Numba has no float16 on the CPU, so half <-> single conversions work on the raw bits (uint16 /
uint32 views) and round to nearest even exactly as IEEE 754 (and NumPy) do.
"""
from __future__ import annotations

import os

import numpy as np
from numba import njit

from ..log import logger
from .ops import MAX, MIN, PROD, SUM

_JIT = dict(nogil=True, cache=True, boundscheck=False)


# --------------------------------------------------------------------------------------- reduce
@njit(**_JIT)
def _reduce_into(dst, src, op):
    n = dst.shape[0]
    if op == SUM:
        for i in range(n):
            dst[i] += src[i]
    elif op == PROD:
        for i in range(n):
            dst[i] *= src[i]
    elif op == MIN:
        for i in range(n):
            if src[i] < dst[i]:
                dst[i] = src[i]
    elif op == MAX:
        for i in range(n):
            if src[i] > dst[i]:
                dst[i] = src[i]


def reduce_into(dst: np.ndarray, src: np.ndarray, op: int) -> None:
    """dst[i] = dst[i] (op) src[i] for 1-D contiguous arrays of one dtype (op: a kernel op code)."""
    if dst.shape[0]:
        _reduce_into(dst, src, op)


def reduce_into_ref(dst: np.ndarray, src: np.ndarray, op: int) -> None:
    """NumPy reference for :func:`reduce_into` (min/max keep dst on ties, like the kernel)."""
    if op == SUM:
        np.add(dst, src, out=dst)
    elif op == PROD:
        np.multiply(dst, src, out=dst)
    elif op == MIN:
        np.copyto(dst, src, where=src < dst)
    elif op == MAX:
        np.copyto(dst, src, where=src > dst)


# ------------------------------------------------------------------ order keys for min / max
# min/max over floats must propagate NaN and order -0 < +0 (IEEE 754-2019 minimum/maximum, what
# NumPy's np.minimum/np.maximum do) and give the *same bits* on every rank whatever algorithm
# reduced them. A comparison-based kernel cannot: `a > b` is false for NaN either way round, so
# the result depends on which operand each rank happened to hold. Instead each float is mapped
# to an integer whose order is the float's total order (non-negative floats keep their bits,
# negative ones flip all but the sign bit), every NaN to the extreme key that wins (INT_MAX for
# max, INT_MIN for min - no finite float maps there), the integers are reduced exactly by any
# algorithm including the MPI library's, and mapped back (the extreme key -> one canonical quiet
# NaN). The keys take no extra memory: the transform is in place on the buffer's bits.
@njit(**_JIT)
def _to_keys(bits, nan_key, top, exp_mask, mant_mask):
    for i in range(bits.shape[0]):
        b = bits[i]
        if (b & exp_mask) == exp_mask and (b & mant_mask) != 0:
            bits[i] = nan_key
        elif b < 0:
            bits[i] = b ^ top


@njit(**_JIT)
def _from_keys(bits, nan_key, top, qnan):
    for i in range(bits.shape[0]):
        k = bits[i]
        if k == nan_key:
            bits[i] = qnan
        elif k < 0:
            bits[i] = k ^ top


_KEYS = {np.dtype(np.float32): (np.int32, 0x7F800000, 0x007FFFFF, 0x7FC00000),
         np.dtype(np.float64): (np.int64, 0x7FF0000000000000, 0x000FFFFFFFFFFFFF, 0x7FF8000000000000)}


def _key_consts(dtype, op):
    it, exp, mant, qnan = _KEYS[dtype]
    info = np.iinfo(it)
    return it, it(info.max if op == MAX else info.min), it(info.max), it(exp), it(mant), it(qnan)


def to_keys(buf: np.ndarray, op: int) -> np.ndarray:
    """Map a 1-D contiguous float32/float64 buffer in place to order keys for `op` (MIN or MAX);
    returns the integer view to reduce."""
    it, nan_key, top, exp, mant, _ = _key_consts(buf.dtype, op)
    bits = buf.view(it)
    if bits.shape[0]:
        _to_keys(bits, nan_key, top, exp, mant)
    return bits


def from_keys(bits: np.ndarray, dtype, op: int) -> np.ndarray:
    """Inverse of :func:`to_keys` in place; returns the float view."""
    _, nan_key, top, _, _, qnan = _key_consts(np.dtype(dtype), op)
    if bits.shape[0]:
        _from_keys(bits, nan_key, top, qnan)
    return bits.view(dtype)


def minmax_ref(a: np.ndarray, b: np.ndarray, op: int) -> np.ndarray:
    """NumPy reference of the key reduction: np.minimum/np.maximum (NaN propagates) with -0 < +0
    and every NaN made the canonical quiet NaN."""
    out = (np.minimum if op == MIN else np.maximum)(a, b)
    zero = (out == 0) & (a == 0) & (b == 0)
    signed = np.signbit(a) | np.signbit(b) if op == MIN else np.signbit(a) & np.signbit(b)
    out = np.where(zero, np.where(signed, -0.0, 0.0).astype(out.dtype), out)
    return np.where(np.isnan(out), np.array(np.nan, out.dtype), out)


# ---------------------------------------------------------------------------------------- scale
@njit(**_JIT)
def _divide(buf, d):
    for i in range(buf.shape[0]):
        buf[i] = buf[i] / d


@njit(**_JIT)
def _floor_divide(buf, d):
    for i in range(buf.shape[0]):
        buf[i] = buf[i] // d


def divide(buf: np.ndarray, d: int) -> None:
    """In-place ``buf / d`` (floats, true division: the same bits as NumPy) or ``buf // d`` (ints)."""
    if not buf.shape[0]:
        return
    if buf.dtype.kind == "f":
        _divide(buf, buf.dtype.type(d))
    else:
        _floor_divide(buf, buf.dtype.type(d))


def divide_ref(buf: np.ndarray, d: int) -> None:
    if buf.dtype.kind == "f":
        np.divide(buf, buf.dtype.type(d), out=buf)
    else:
        np.floor_divide(buf, buf.dtype.type(d), out=buf)


# ------------------------------------------------------------------------------------ fp16 casts
@njit(**_JIT)
def _half_to_float_bits(src, dst):
    # src: uint16 half bits, dst: uint32 single bits. Exact (every half is a single).
    for i in range(src.shape[0]):
        h = np.uint32(src[i])
        sign = (h & np.uint32(0x8000)) << np.uint32(16)
        exp = (h >> np.uint32(10)) & np.uint32(0x1F)
        mant = h & np.uint32(0x3FF)
        if exp == 0:
            if mant == 0:
                dst[i] = sign
            else:  # subnormal half -> normal single: shift the leading one into the hidden bit
                e = np.uint32(0)
                while (mant & np.uint32(0x400)) == 0:
                    mant <<= np.uint32(1)
                    e += np.uint32(1)
                dst[i] = sign | ((np.uint32(113) - e) << np.uint32(23)) | ((mant & np.uint32(0x3FF)) << np.uint32(13))
        elif exp == 31:  # inf / nan (payload kept)
            dst[i] = sign | np.uint32(0x7F800000) | (mant << np.uint32(13))
        else:
            dst[i] = sign | ((exp + np.uint32(112)) << np.uint32(23)) | (mant << np.uint32(13))


@njit(**_JIT)
def _float_to_half_bits(src, dst):
    # src: uint32 single bits, dst: uint16 half bits; round to nearest, ties to even.
    for i in range(src.shape[0]):
        f = src[i]
        sign = np.uint32((f >> np.uint32(16)) & np.uint32(0x8000))
        exp = np.int64((f >> np.uint32(23)) & np.uint32(0xFF))
        mant = np.uint32(f & np.uint32(0x7FFFFF))
        if exp == 255:
            if mant == 0:
                h = sign | np.uint32(0x7C00)
            else:
                m = mant >> np.uint32(13)
                if m == 0:  # keep a NaN a NaN when its payload sits in the dropped bits
                    m = np.uint32(1)
                h = sign | np.uint32(0x7C00) | m
        else:
            e = exp - 112  # rebias 127 -> 15
            if e >= 31:
                h = sign | np.uint32(0x7C00)
            elif e <= 0:
                if e < -10:
                    h = sign  # below half the smallest subnormal: rounds to zero
                else:
                    m = mant | np.uint32(0x800000)
                    shift = np.uint32(126 - exp)
                    hm = m >> shift
                    rem = m & ((np.uint32(1) << shift) - np.uint32(1))
                    half = np.uint32(1) << (shift - np.uint32(1))
                    if rem > half or (rem == half and (hm & np.uint32(1))):
                        hm += np.uint32(1)
                    h = sign | hm
            else:
                hm = mant >> np.uint32(13)
                rem = mant & np.uint32(0x1FFF)
                h = sign | (np.uint32(e) << np.uint32(10)) | hm
                if rem > np.uint32(0x1000) or (rem == np.uint32(0x1000) and (hm & np.uint32(1))):
                    h += np.uint32(1)  # a carry out of the mantissa bumps the exponent (to inf at most)
        dst[i] = np.uint16(h)


def half_to_float(src: np.ndarray, dst: np.ndarray) -> None:
    """dst (float32, 1-D) = src (float16, 1-D), exactly."""
    if src.shape[0]:
        _half_to_float_bits(src.view(np.uint16), dst.view(np.uint32))


def float_to_half(src: np.ndarray, dst: np.ndarray) -> None:
    """dst (float16, 1-D) = src (float32, 1-D) rounded to nearest even (NumPy's astype, bit for bit)."""
    if src.shape[0]:
        _float_to_half_bits(src.view(np.uint32), dst.view(np.uint16))


# ------------------------------------------------------------------------------- pack / unpack
@njit(**_JIT)
def _pack(src, starts, lengths, dst):
    pos = 0
    for k in range(starts.shape[0]):
        s = starts[k]
        for j in range(lengths[k]):
            dst[pos + j] = src[s + j]
        pos += lengths[k]


@njit(**_JIT)
def _unpack(src, starts, lengths, dst):
    pos = 0
    for k in range(starts.shape[0]):
        s = starts[k]
        for j in range(lengths[k]):
            dst[s + j] = src[pos + j]
        pos += lengths[k]


def pack(src: np.ndarray, starts: np.ndarray, lengths: np.ndarray, dst: np.ndarray) -> None:
    """Concatenate the byte ranges src[starts[k]:starts[k]+lengths[k]] into dst (uint8 arrays)."""
    _pack(src, starts, lengths, dst)


def unpack(src: np.ndarray, starts: np.ndarray, lengths: np.ndarray, dst: np.ndarray) -> None:
    """Inverse of :func:`pack`: scatter the concatenated ranges of src back to dst[starts[k]:...]."""
    _unpack(src, starts, lengths, dst)


def pack_ref(src, starts, lengths, dst) -> None:
    pos = 0
    for s, n in zip(starts, lengths):
        dst[pos:pos + n] = src[s:s + n]
        pos += n


def unpack_ref(src, starts, lengths, dst) -> None:
    pos = 0
    for s, n in zip(starts, lengths):
        dst[s:s + n] = src[pos:pos + n]
        pos += n


def first_compile(module_file: str) -> bool:
    """True when numba has no cached compilation of this module yet (the first run on a machine)."""
    d = os.path.join(os.path.dirname(module_file), "__pycache__")
    stem = os.path.splitext(os.path.basename(module_file))[0] + "."
    return not (os.path.isdir(d) and any(f.startswith(stem) and f.endswith(".nbi") for f in os.listdir(d)))


def warmup() -> None:
    """Compile (or load from numba's cache) every specialization the collectives use."""
    if first_compile(__file__):
        logger.info("compiling the numba kernels (first run only: cached for later runs)")
    for op in (MIN, MAX):
        for dt in (np.float32, np.float64):
            from_keys(to_keys(np.zeros(2, dt), op), dt, op)
    for t in (np.float32, np.float64, np.int32, np.int64):
        a = np.ones(2, t)
        for op in (SUM, PROD, MIN, MAX):
            reduce_into(a, a.copy(), op)
        divide(a, 2)
    half_to_float(np.ones(2, np.float16), np.empty(2, np.float32))
    float_to_half(np.ones(2, np.float32), np.empty(2, np.float16))
    b = np.arange(8, dtype=np.uint8)
    st, ln = np.array([0, 4], np.int64), np.array([2, 2], np.int64)
    pack(b, st, ln, np.empty(4, np.uint8))
    unpack(np.empty(4, np.uint8), st, ln, b)
