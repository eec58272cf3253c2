"""Stage partitioning: contiguous layer ranges that minimise the most expensive stage, from
*measured* per-layer forward+backward times (the device-placement problem: the slowest stage sets
the pipeline's pace, so balancing by layer count is wrong whenever layers differ in cost)."""
from __future__ import annotations

import time

import numpy as np

from . import activations as A


def partition(costs, stages: int) -> list:
    """Contiguous ranges [(start, end), ...] of len(costs) layers over `stages` stages that minimise
    the largest stage cost (linear partition by dynamic programming, O(stages * n^2)); ties prefer
    earlier cuts. Raises ValueError if there are fewer layers than stages."""
    costs = [float(c) for c in costs]
    n = len(costs)
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if n < stages:
        raise ValueError(f"{n} layers cannot fill {stages} pipeline stages: use at most {n} stages "
                         f"or a model with at least {stages} layers")
    prefix = np.concatenate([[0.0], np.cumsum(costs)])
    inf = float("inf")
    best = np.full((stages + 1, n + 1), inf)  # best[k][j]: first j layers on k stages
    cut = np.zeros((stages + 1, n + 1), np.int64)
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):  # stage k holds layers i..j-1
                v = max(best[k - 1][i], prefix[j] - prefix[i])
                if v < best[k][j] - 1e-15:
                    best[k][j], cut[k][j] = v, i
    out, j = [], n
    for k in range(stages, 0, -1):
        out.append((int(cut[k][j]), j))
        j = int(cut[k][j])
    return out[::-1]


def measure_layer_costs(layers, x, repeats: int = 3) -> list:
    """Median forward+backward seconds of each layer in sequence on the sample batch x, after one
    untimed warm-up run (the input
    of layer i is layer i-1's output; tuples of arrays as activations.py describes). Run it on every rank or broadcast rank 0's result: stage
    boundaries must be identical everywhere."""
    costs = []
    for layer in layers:
        times = []
        for _ in range(1 + repeats):  # the first, untimed: numba's compilation, first-touch allocations
            t = time.perf_counter()
            y = layer.forward(x)
            layer.backward(A.ones_grad(y))
            times.append(time.perf_counter() - t)
        times = times[1:]
        for p in layer.parameters():
            p.grad[...] = 0
        costs.append(float(np.median(times)))
        x = y
    return costs


def assign(costs, stages: int, chunks: int = 1) -> list:
    """Per stage, its chunks' layer ranges: the layers cut into stages x chunks contiguous chunks
    (``partition``), global chunk g = c * stages + s going to stage s as its chunk c - the
    round-robin assignment of interleaved pipelines (Narayanan et al. 2021). With one chunk: each
    stage's one range, as ``partition`` gives it."""
    bounds = partition(costs, stages * chunks)
    return [[bounds[c * stages + s] for c in range(chunks)] for s in range(stages)]
