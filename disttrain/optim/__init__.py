"""Optimizers and learning-rate schedules."""
from .adagrad import RowWiseAdagrad
from .adam import Adam, AdamW
from .lamb import LAMB
from .optimizer import Optimizer
from .schedule import Schedule, WarmupCosine, WarmupStep, linear_scaling
from .sgd import SGD
from ..registry import Registry

#: name -> optimizer class (the main job's --optimizer; every class takes (params, lr, **options))
OPTIMIZERS = Registry("optimizer")
for _name, _cls in (("sgd", SGD), ("adam", Adam), ("adamw", AdamW), ("lamb", LAMB)):
    OPTIMIZERS.register(_name)(_cls)

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "LAMB", "RowWiseAdagrad", "OPTIMIZERS", "Schedule", "WarmupCosine",
           "WarmupStep", "linear_scaling"]
