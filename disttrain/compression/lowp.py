"""fp16 and bf16 compression: 16-bit values on the wire, sums accumulated in the gradient's dtype.

Both go through the ring allreduce with a narrow wire format (``comm.ring.ring_allreduce`` given a
codec): each segment is rounded to 16 bits just before it is sent and widened when it arrives, so
the running sums never live in 16 bits (Micikevicius et al. 2018, "Mixed Precision Training", keep
fp32 accumulation for the same reason). Half the bytes of a float32 ring, exactly 2x.

- fp16 has 5 exponent bits (max 65504, normals down to 6.1e-5): the bucket is first multiplied by
  a power of two chosen from the *global* largest magnitude so that no partial sum of p ranks can
  overflow - |sum| <= p * max|g| * scale <= 65504 - and small gradients use the top of the range
  instead of vanishing into subnormals (the idea of loss scaling, applied per bucket). The scale is
  one 8-byte MPI_MAX allreduce. A power of two makes scaling exact.
- bf16 keeps float32's 8-bit exponent, so it needs no scaling; it rounds to nearest even in the
  numba kernel (kernels.bf16_encode), with 8 bits of mantissa.
"""
from __future__ import annotations

import math

import numpy as np

from .. import mpi

from ..comm.kernels import float_to_half, half_to_float, reduce_into
from ..comm.ops import SUM
from ..comm.p2p import scratch
from ..comm import lowlevel as L
from .base import Compressor, register, ring_allreduce_bytes
from .kernels import bf16_decode, bf16_encode

FP16_MAX = 65504.0
_MAX_EXP = 100  # keep scales representable in float32 even for absurdly small gradients


def _maxabs(x: np.ndarray) -> float:
    """max |x| without an |x| temporary (nan if x holds one; 0 for an empty x)."""
    return max(float(x.max()), -float(x.min())) if x.size else 0.0


def _as_f32(src: np.ndarray) -> np.ndarray:
    return src if src.dtype == np.float32 else src.astype(np.float32)


class _Codec:
    """A 16-bit wire format for the ring allreduce: encode, decode, decode-and-add."""

    wire_dtype = np.dtype(np.uint16)

    def __init__(self, to16, from16):
        self._to16, self._from16 = to16, from16

    def encode(self, src: np.ndarray, dst: np.ndarray) -> None:
        self._to16(_as_f32(src), dst.view(np.uint16))

    def decode(self, src: np.ndarray, dst: np.ndarray) -> None:
        if dst.dtype == np.float32:
            self._from16(src, dst)
        else:
            tmp = scratch(src.shape[0], np.float32, slot=7)
            self._from16(src, tmp)
            dst[...] = tmp

    def accumulate(self, dst: np.ndarray, src: np.ndarray) -> None:
        tmp = scratch(src.shape[0], np.float32, slot=7)
        self._from16(src, tmp)
        reduce_into(dst, tmp, SUM)


def _half_from_bits(src, dst):
    half_to_float(src.view(np.float16), dst)


def _half_to_bits(src, dst):
    float_to_half(src, dst.view(np.float16))


FP16_CODEC = _Codec(_half_to_bits, _half_from_bits)
BF16_CODEC = _Codec(bf16_encode, bf16_decode)


class _SixteenBit(Compressor):
    codec: _Codec

    def check_algorithm(self, algorithm: str) -> str | None:
        if algorithm not in ("auto", "ring"):
            return (f"compression {self.name!r} reduces with its own 16-bit-wire ring allreduce; "
                    f"algorithm must be 'auto' or 'ring', got {algorithm!r}")
        return None

    def _scale(self, maxabs: float, p: int) -> float:
        return 1.0

    def compress(self, x: np.ndarray, key: str = "default", layout=None):
        flat = np.ascontiguousarray(x).reshape(-1)
        scale = self._scale(_maxabs(flat), 1)
        out = np.empty(flat.size, np.uint16)
        self.codec.encode(flat * flat.dtype.type(scale) if scale != 1.0 else flat, out)
        return out, (x.shape, x.dtype, scale)

    def decompress(self, payload, ctx) -> np.ndarray:
        shape, dtype, scale = ctx
        out = np.empty(payload.shape[0], np.float32)
        self.codec.decode(payload, out)
        return (out / np.float32(scale)).astype(dtype).reshape(shape)

    def reduce_(self, bucket, comm, algorithm="auto"):
        buf = bucket.buffer
        p = comm.Get_size()
        scale = self._global_scale(buf, comm)
        if scale != 1.0:
            np.multiply(buf, buf.dtype.type(scale), out=buf)
        L.ring_allreduce_on(comm, buf, "sum", self.codec)
        np.divide(buf, buf.dtype.type(scale * p), out=buf)  # scale is a power of two: exact undo
        self.stats.record(buf.nbytes, 2 * buf.size, ring_allreduce_bytes(buf.size, 2, p))
        return buf

    def _global_scale(self, buf, comm) -> float:
        return 1.0


@register("fp16")
class FP16(_SixteenBit):
    """IEEE half precision on the wire with an overflow-proof power-of-two scale (see module doc)."""

    codec = FP16_CODEC

    def _scale(self, maxabs: float, p: int) -> float:
        if not (maxabs > 0.0 and math.isfinite(maxabs)):  # zeros, or inf/nan: send as they are
            return 1.0
        e = math.floor(math.log2(FP16_MAX / (p * maxabs)))
        while p * maxabs * 2.0 ** e > FP16_MAX:  # guard log2's last-bit rounding
            e -= 1
        return 2.0 ** min(e, _MAX_EXP)

    def _global_scale(self, buf, comm) -> float:
        MPI = mpi.MPI
        m = _maxabs(buf)
        # A NaN must not enter the MAX vote: MPI's MAX is a comparison, and a comparison with NaN
        # is false, so whether the NaN survives depends on the order each rank combines the
        # partial maxima in - different ranks would get different scales, and reduce the same
        # data to different bits. +inf orders like any number, so every rank agrees on it: scale
        # 1, and the NaN (or inf) still travels in the data, so every rank's result is non-finite
        # and every rank skips the step.
        local = np.array([m if math.isfinite(m) else math.inf])
        if comm.Get_size() > 1:
            comm.Allreduce(MPI.IN_PLACE, local, op=MPI.MAX)
        return self._scale(float(local[0]), comm.Get_size())


@register("bf16")
class BF16(_SixteenBit):
    """bfloat16 on the wire (round to nearest even); float32's range, so no scaling."""

    codec = BF16_CODEC
