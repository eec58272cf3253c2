"""Central finite differences: the oracle for every layer's backward (the library's own, which
dt.gradcheck uses too)."""
from disttrain.nn.gradcheck import numeric_grad

__all__ = ["numeric_grad"]
