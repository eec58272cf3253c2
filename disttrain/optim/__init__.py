"""Optimizers and learning-rate schedules."""
from .adam import Adam, AdamW
from .lamb import LAMB
from .optimizer import Optimizer
from .schedule import Schedule, WarmupCosine, WarmupStep, linear_scaling
from .sgd import SGD

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "LAMB", "Schedule", "WarmupCosine", "WarmupStep", "linear_scaling"]
