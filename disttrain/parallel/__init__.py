"""Parallel training schedulers: data parallelism (data.py); model, pipeline and hybrid to come."""
from .data import DataParallel, broadcast_optimizer_state, broadcast_parameters

__all__ = ["DataParallel", "broadcast_parameters", "broadcast_optimizer_state"]
