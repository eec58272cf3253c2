"""Multi-tensor activations: what flows between pipeline units.

A unit's input and output is an ndarray or a flat *tuple* of ndarrays - e.g. a seq2seq decoder
stage needs the encoder states, the source lengths (its attention mask) and the decoder inputs
together. The protocol, for every unit and for the runtime:

- every part is batch-major (axis 0 = samples), so a batch splits into micro-batches part by part;
- the gradient of a tuple is a tuple of the same length: an array for each floating-point part,
  None for a part without a gradient (integer ids, lengths, masks) - ``backward`` receives and
  returns that form (the first unit, whose inputs are data, may return None);
- every part travels in its own dtype (the message header says which).

The messages (p2p.py) carry the structure in their header (the tuple flag, each part's dtype and
shape, None parts), so nothing is special-cased per model.
"""
from __future__ import annotations

import numpy as np

from ...nn.module import Module


def parts(a) -> list:
    """The arrays (or None) of an activation or gradient, in order."""
    return list(a) if isinstance(a, tuple) else [a]


def rows(x) -> int:
    """Samples in a batch (axis 0 of its first part)."""
    return len(parts(x)[0])


def split(x, m: int) -> list:
    """x cut into m micro-batches along axis 0 (``np.array_split`` sizes: the first len % m get one
    more sample); a tuple is cut part by part."""
    if not isinstance(x, tuple):
        return np.array_split(x, m)
    return list(zip(*(np.array_split(p, m) for p in x)))


def head(x, n: int):
    """The first n samples of a batch."""
    return tuple(p[:n] for p in x) if isinstance(x, tuple) else x[:n]


def shape_key(x) -> tuple:
    """A hashable key of a batch's shapes and dtypes (what decides whether the message shapes are
    known: a stage without parameters passes its input's dtype on, so a dtype is part of a shape)."""
    return tuple((p.dtype.str, p.shape) for p in parts(x)) if isinstance(x, tuple) else (x.dtype.str, *x.shape)


def differentiable(p) -> bool:
    return p is not None and np.issubdtype(p.dtype, np.floating)


def ones_grad(y):
    """A gradient of the form ``backward`` takes for the output y: ones for floating-point parts,
    None for the others (cost measurements, tests)."""
    if not isinstance(y, tuple):
        return np.ones_like(y)
    return tuple(np.ones_like(p) if differentiable(p) else None for p in y)


class Carry(Module):
    """A single-tensor layer as a unit of a multi-tensor pipeline: ``layer`` runs on part 0 of the
    tuple, the other parts are carried through unchanged (forward and backward) - e.g. DLRM's
    bottom MLP, next to the embedding vectors that wait for the interaction.

    Args:
        layer: a Module taking and returning one array.

    Example:
        >>> Carry(nn.Linear(8, 16)).forward((dense, e))  # -> (linear(dense), e)
    """

    def __init__(self, layer: Module):
        self.layer = layer

    def forward(self, x):
        return (self.layer.forward(x[0]), *x[1:])

    def backward(self, dy):
        return (self.layer.backward(dy[0]), *dy[1:])

    def backward_input(self, dy):
        return (self.layer.backward_input(dy[0]), *dy[1:])

    def backward_weight(self) -> None:
        self.layer.backward_weight()
