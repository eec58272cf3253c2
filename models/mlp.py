"""Multi-layer perceptron: Linear -> activation -> ... -> Linear (logits)."""
from __future__ import annotations

import numpy as np

from disttrain import nn


class MLP(nn.Sequential):
    """MLP([784, 1024, 1024, 10]): Kaiming-initialised hidden layers with `activation`, a Xavier
    output layer, optional dropout after each hidden activation. `seed` fixes the initial weights,
    so every rank builds the same model (broadcast_parameters makes sure of it anyway).
    `input_grad=False` (default) skips the gradient w.r.t. the data in the first layer's backward;
    pass True when the MLP sits behind another layer (a pipeline stage, an embedding)."""

    def __init__(self, sizes, activation: str = "relu", dropout: float = 0.0, seed: int = 0, dtype=np.float32,
                 input_grad: bool = False):
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least input and output sizes, got {sizes}")
        rng = np.random.default_rng(seed)
        act = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}[activation]
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            last = i == len(sizes) - 2
            layers.append(nn.Linear(a, b, init="xavier" if last else "kaiming", rng=rng, dtype=dtype,
                                    input_grad=input_grad or i > 0))
            if not last:
                layers.append(act())
                if dropout:
                    layers.append(nn.Dropout(dropout, rng=np.random.default_rng(seed + 1000 + i)))
        super().__init__(*layers)
