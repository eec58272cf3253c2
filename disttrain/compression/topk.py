"""Top-k sparsification with error feedback (Aji & Heafield 2017; Lin et al. 2018, "Deep Gradient
Compression"; Stich et al. 2018, "Sparsified SGD with Memory").

Each rank adds its residual to the new gradient, sends only the k = floor(ratio * n) entries of
largest magnitude (at least one) as k values then k int32 indices, and keeps the rest as the
residual for the next step, so nothing is lost - only delayed. The selection is an O(n) radix
select on the magnitudes' bit patterns in numba (kernels.topk_select; measured 1.7 ms for 1 M
float32 against 10.7 ms for NumPy's argpartition). Different ranks pick different indices, so the
payloads cannot be summed on the way (a densified allreduce would send n values again): they are
exchanged with one allgather, and every rank scatter-adds all p of them in rank order, which gives
every rank the same bits. Bytes per rank: 8k instead of 4n (float32), 1/(2 ratio).
"""
from __future__ import annotations

import numpy as np

from .base import Compressor, allgather_equal, register
from .kernels import scatter_add, topk_select


@register("topk")
class TopK(Compressor):
    """Keep the k largest-magnitude entries per bucket; the rest stay in the residual.

    Args:
        ratio: the fraction of entries sent, 0 < ratio <= 1 (default 0.01: 1%).
    """

    exchange = "allgather"

    param = float
    param_name = "RATIO"

    def __init__(self, ratio: float = 0.01):
        super().__init__()
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"top-k ratio must be in (0, 1], got {ratio}")
        self.ratio = float(ratio)

    @property
    def spec(self) -> str:
        return f"topk:{self.ratio:g}"

    def k(self, n: int) -> int:
        """Entries sent out of n."""
        return 0 if n == 0 else max(1, min(n, int(self.ratio * n)))

    def compress(self, x: np.ndarray, key: str = "default", layout=None):
        acc = self._accumulate(key, x)  # gradient + old residual, in the new residual's buffer
        k = self.k(acc.shape[0])
        payload = np.empty(k * (4 + acc.itemsize), np.uint8)
        vals, idx = _split(payload, k, acc.dtype)
        topk_select(acc, k, idx, vals)  # what is sent leaves the memory; the residual keeps the rest
        return payload, (x.shape, x.dtype, k)

    def decompress(self, payload, ctx) -> np.ndarray:
        shape, dtype, k = ctx
        out = np.zeros(int(np.prod(shape, dtype=np.int64)), dtype)
        vals, idx = _split(payload, k, dtype)
        scatter_add(out, idx, vals)
        return out.reshape(shape)

    def reduce_(self, bucket, comm, algorithm="auto"):
        buf, key = bucket.buffer, bucket.key
        p = comm.Get_size()
        payload, (_, _, k) = self.compress(buf, key)
        every = allgather_equal(comm, payload)
        buf[...] = 0
        for row in every:  # rank order on every rank: identical sums everywhere
            vals, idx = _split(row, k, buf.dtype)
            scatter_add(buf, idx, vals)
        np.divide(buf, buf.dtype.type(p), out=buf)
        self.stats.record(buf.nbytes, payload.nbytes, (p - 1) * payload.nbytes)
        return buf


def _split(payload: np.ndarray, k: int, dtype) -> tuple:
    """(values, indices) views of a payload: values first, so both views are aligned."""
    cut = k * np.dtype(dtype).itemsize
    return payload[:cut].view(dtype), payload[cut:].view(np.int32)
