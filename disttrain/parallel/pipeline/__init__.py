"""Pipeline parallelism: model stages (or interleaved chunks) on different ranks, micro-batches,
schedules with and without a bubble, activation recomputation.

- ``schedules.py``: ``SCHEDULES`` - gpipe, 1f1b, interleaved (virtual stages), zb1 and zb2 (zero bubble,
  split backward) - with each schedule's rule and bubble formula, and ``simulate``;
- ``executor.py``: ``Pipeline``, the runtime that runs a schedule's ops on this rank's stage;
- ``stash.py``: what is kept between forward and backward, and recomputation;
- ``p2p.py``: the point-to-point messages between stages;
- ``channel.py``: the shared-memory channel that carries them between ranks of one node;
- ``activations.py``: multi-tensor activations (tuples of arrays) between units, ``Carry``;
- ``partition.py``: contiguous stage (or chunk) boundaries from measured layer costs.
"""
from . import activations
from .activations import Carry
from .executor import Pipeline
from .partition import assign, measure_layer_costs, partition
from .schedules import SCHEDULES, simulate
from .stash import RECOMPUTE


def bubble_fraction(stages: int, micro_batches: int, schedule: str = "1f1b", chunks: int = 1) -> float:
    """The idle share of a step with equal stage times by the schedule's formula (1F1B and GPipe:
    (p - 1) / (m + p - 1))."""
    return SCHEDULES[schedule].bubble(stages, micro_batches, chunks)


__all__ = ["Pipeline", "Carry", "activations", "SCHEDULES", "RECOMPUTE", "simulate", "bubble_fraction", "partition", "assign",
           "measure_layer_costs"]
