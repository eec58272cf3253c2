"""Row-sparse optimizer updates in numba (``nogil``, cached): only the rows a step touched.

Each kernel takes the parameter as a 2-D (rows, width) array ``w``, the touched rows ``rows``
(sorted, unique: ``nn.sparse.RowSparseGrad``) and their gradient rows ``g`` (len(rows), width),
and updates ``w`` and the state in place at those rows only - work proportional to the lookups, not
to the table. Each kernel has a NumPy twin (``_ref``) that the tests compare it with.

Semantics (the optimizers' docstrings repeat them):

- ``sgd_rows``: PyTorch's SGD rule on the touched rows, momentum buffer ``v`` zero-initialised
  (so the first touch gives v = d, PyTorch's first step). Untouched rows keep their weights AND
  their momentum (lazy momentum, TensorFlow's ``SparseApplyMomentum``): unlike dense momentum they
  do not keep moving by ``mu^k v``. Weight decay applies to touched rows only.
- ``adam_rows``: lazy Adam (TensorFlow Addons' LazyAdam, PyTorch's SparseAdam): the touched rows'
  m, v and weights are updated, the others keep all three; the bias corrections
  ``bc1 = 1 - b1^t``, ``bc2 = 1 - b2^t`` use the optimizer's global step t (not a per-row count),
  and the update is disttrain's dense Adam's ``lr * (m / bc1) / (sqrt(v / bc2) + eps)`` (Kingma & Ba
  2015, Algorithm 1), so a table whose every row is touched every step follows dense Adam.
- ``adagrad_rows``: row-wise Adagrad (the DLRM / FBGEMM "rowwise adagrad"; Duchi et al. 2011 with
  one accumulator per row): ``s[r] += mean_j(d[r, j]^2)``, ``w[r] -= lr * d[r] / (sqrt(s[r]) + eps)``
  with ``d = g + wd * w``. An untouched row has a zero gradient, so without weight decay the lazy
  and the dense update are the same.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

_JIT = dict(nogil=True, cache=True, boundscheck=False)


@njit(**_JIT)
def sgd_rows(w, rows, g, v, lr, momentum, weight_decay, nesterov):
    for k in range(rows.shape[0]):
        r = rows[k]
        for j in range(w.shape[1]):
            d = g[k, j] + weight_decay * w[r, j]
            if momentum != 0.0:
                vi = momentum * v[r, j] + d
                v[r, j] = vi
                d = d + momentum * vi if nesterov else vi
            w[r, j] -= lr * d


def sgd_rows_ref(w, rows, g, v, lr, momentum, weight_decay, nesterov):
    d = g + weight_decay * w[rows]
    if momentum:
        v[rows] = momentum * v[rows] + d
        d = d + momentum * v[rows] if nesterov else v[rows]
    w[rows] -= lr * d


@njit(**_JIT)
def adam_rows(w, rows, g, m, v, lr, b1, b2, eps, weight_decay, decoupled, bc1, bc2):
    for k in range(rows.shape[0]):
        r = rows[k]
        for j in range(w.shape[1]):
            gi = g[k, j]
            if weight_decay != 0.0 and not decoupled:
                gi = gi + weight_decay * w[r, j]
            mi = b1 * m[r, j] + (1 - b1) * gi
            vi = b2 * v[r, j] + (1 - b2) * gi * gi
            m[r, j] = mi
            v[r, j] = vi
            if weight_decay != 0.0 and decoupled:
                w[r, j] -= lr * weight_decay * w[r, j]
            w[r, j] -= lr * (mi / bc1) / (math.sqrt(vi / bc2) + eps)


def adam_rows_ref(w, rows, g, m, v, lr, b1, b2, eps, weight_decay, decoupled, bc1, bc2):
    if weight_decay and not decoupled:
        g = g + weight_decay * w[rows]
    m[rows] = b1 * m[rows] + (1 - b1) * g
    v[rows] = b2 * v[rows] + (1 - b2) * g * g
    if weight_decay and decoupled:
        w[rows] -= lr * weight_decay * w[rows]
    w[rows] -= lr * (m[rows] / bc1) / (np.sqrt(v[rows] / bc2) + eps)


@njit(**_JIT)
def adagrad_rows(w, rows, g, s, lr, eps, weight_decay):
    n = w.shape[1]
    for k in range(rows.shape[0]):
        r = rows[k]
        acc = 0.0
        for j in range(n):
            d = g[k, j] + weight_decay * w[r, j]
            acc += d * d
        s[r, 0] += acc / n
        scale = lr / (math.sqrt(s[r, 0]) + eps)
        for j in range(n):
            w[r, j] -= scale * (g[k, j] + weight_decay * w[r, j])


def adagrad_rows_ref(w, rows, g, s, lr, eps, weight_decay):
    d = g + weight_decay * w[rows]
    s[rows] += (d * d).mean(axis=1, keepdims=True)
    w[rows] -= lr / (np.sqrt(s[rows]) + eps) * d
