"""Multi-layer perceptron: Linear -> activation -> ... -> Linear (logits)."""
from __future__ import annotations

import numpy as np

from disttrain import nn
from disttrain.parallel.tensor import ColumnParallelLinear, RowParallelLinear


class MLP(nn.Sequential):
    """MLP([784, 1024, 1024, 10]): Kaiming-initialised hidden layers with `activation`, a Xavier
    output layer, optional dropout after each hidden activation. `seed` fixes the initial weights,
    so every rank builds the same model (broadcast_parameters makes sure of it anyway).
    `input_grad=False` (default) skips the gradient w.r.t. the data in the first layer's backward;
    pass True when the MLP sits behind another layer (a pipeline stage, an embedding).

    `tp_group` (a tensor-parallel Group of size > 1) splits the Linear layers Megatron-style in
    pairs: layer 2i column-parallel (its activation runs on the local columns), layer 2i + 1
    row-parallel (one allreduce); an unpaired last layer stays replicated. Same seed, same model.
    `blocks()` gives the pipeline units: each Linear with the activation (and dropout) after it."""

    def __init__(self, sizes, activation: str = "relu", dropout: float = 0.0, seed: int = 0, dtype=np.float32,
                 input_grad: bool = False, tp_group=None):
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least input and output sizes, got {sizes}")
        rng = np.random.default_rng(seed)
        act = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}[activation]
        layers, n = [], len(sizes) - 1
        tp = tp_group is not None and tp_group.size > 1
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            last = i == len(sizes) - 2
            init, grad = "xavier" if last else "kaiming", input_grad or i > 0
            if tp and i % 2 == 0 and i + 1 < n:
                layers.append(ColumnParallelLinear(a, b, tp_group, init=init, rng=rng, dtype=dtype, input_grad=grad))
            elif tp and i % 2 == 1:
                layers.append(RowParallelLinear(a, b, tp_group, init=init, rng=rng, dtype=dtype))
            else:
                layers.append(nn.Linear(a, b, init=init, rng=rng, dtype=dtype, input_grad=grad))
            if not last:
                layers.append(act())
                if dropout:
                    layers.append(nn.Dropout(dropout, rng=np.random.default_rng(seed + 1000 + i)))
        super().__init__(*layers)

    def blocks(self) -> list:
        """The layers grouped as pipeline units: each Linear with what follows it up to the next."""
        out = []
        for m in self.layers:
            if isinstance(m, (nn.Linear, ColumnParallelLinear, RowParallelLinear)) or not out:
                out.append([m])
            else:
                out[-1].append(m)
        return [u[0] if len(u) == 1 else nn.Sequential(*u) for u in out]
