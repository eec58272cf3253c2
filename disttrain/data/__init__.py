"""Data sets, distributed samplers (and, to come, length bucketing)."""
from .datasets import Dataset, load, load_digits
from .sampler import DistributedSampler

__all__ = ["Dataset", "load", "load_digits", "DistributedSampler"]
