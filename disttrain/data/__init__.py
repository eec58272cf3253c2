"""Data sets, distributed samplers, length bucketing for variable-length data, the text corpus."""
from .datasets import Dataset, load, load_digits
from .bucketing import STRATEGIES, Batcher, EpochPlan
from .sampler import DistributedSampler

__all__ = ["Dataset", "load", "load_digits", "DistributedSampler", "Batcher", "EpochPlan", "STRATEGIES"]
