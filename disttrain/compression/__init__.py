"""Gradient compression: one interface, a registry, and the compressors the literature settled on.

    from disttrain import compression
    c = compression.make("topk:0.01")         # or "none", "fp16", "bf16", "onebit", "powersgd:2"
    payload, ctx = c.compress(grad, key="fc1")   # what this rank would send
    approx = c.decompress(payload, ctx)          # what it stands for
    c.reduce_(compression.Bucket(grad, "fc1"), comm)  # the compressed average over the ranks, in place

``dt.DataParallel(model, compression="powersgd:2")`` applies one to every gradient bucket on the
communication thread, overlapped with backward. See base.py for the interface and each module for
its algorithm and paper.
"""
from . import lowp, onebit, powersgd, topk  # noqa: F401  (register)
from .base import COMPRESSORS, Bucket, Compressor, WireStats, make, names, register
from .lowp import BF16, FP16
from .onebit import OneBit
from .powersgd import PowerSGD
from .topk import TopK

__all__ = ["COMPRESSORS", "Bucket", "Compressor", "WireStats", "make", "names", "register",
           "FP16", "BF16", "TopK", "OneBit", "PowerSGD"]
