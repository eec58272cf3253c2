"""Numba kernels for the element-wise and fused layer work; GEMMs go to NumPy's BLAS.

All kernels are ``nogil=True`` (the communication thread keeps reducing gradient buckets while
they run) and ``cache=True``; they work on contiguous 1-D or 2-D arrays and write into outputs the
caller owns. Each has a plain-NumPy twin (suffix ``_ref``) the tests compare it with.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

_JIT = dict(nogil=True, cache=True, boundscheck=False, fastmath=False)
_GELU_C = math.sqrt(2.0 / math.pi)


# ------------------------------------------------------------------------------- activations
@njit(**_JIT)
def relu_fwd(x, y):
    for i in range(x.shape[0]):
        y[i] = x[i] if x[i] > 0 else 0


@njit(**_JIT)
def relu_bwd(x, dy, dx):
    for i in range(x.shape[0]):
        dx[i] = dy[i] if x[i] > 0 else 0


@njit(**_JIT)
def gelu_fwd(x, y):
    # tanh approximation (Hendrycks & Gimpel 2016), as in GPT-2 and Megatron
    for i in range(x.shape[0]):
        v = x[i]
        y[i] = 0.5 * v * (1.0 + math.tanh(_GELU_C * (v + 0.044715 * v * v * v)))


@njit(**_JIT)
def gelu_bwd(x, dy, dx):
    for i in range(x.shape[0]):
        v = x[i]
        u = _GELU_C * (v + 0.044715 * v * v * v)
        t = math.tanh(u)
        du = _GELU_C * (1.0 + 3.0 * 0.044715 * v * v)
        dx[i] = dy[i] * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * du)


@njit(**_JIT)
def tanh_fwd(x, y):
    for i in range(x.shape[0]):
        y[i] = math.tanh(x[i])


@njit(**_JIT)
def sigmoid_fwd(x, y):
    for i in range(x.shape[0]):
        v = x[i]
        if v >= 0:  # the two branches keep exp from overflowing
            y[i] = 1.0 / (1.0 + math.exp(-v))
        else:
            e = math.exp(v)
            y[i] = e / (1.0 + e)


@njit(**_JIT)
def tanh_bwd(y, dy, dx):
    for i in range(y.shape[0]):
        dx[i] = dy[i] * (1.0 - y[i] * y[i])


@njit(**_JIT)
def sigmoid_bwd(y, dy, dx):
    for i in range(y.shape[0]):
        dx[i] = dy[i] * y[i] * (1.0 - y[i])


@njit(**_JIT)
def mul(a, b, out):
    for i in range(a.shape[0]):
        out[i] = a[i] * b[i]


def gelu_ref(x):
    return 0.5 * x * (1.0 + np.tanh(_GELU_C * (x + 0.044715 * x ** 3)))


def sigmoid_ref(x):
    return 1.0 / (1.0 + np.exp(-x))


# ------------------------------------------------------------------- softmax cross-entropy
@njit(**_JIT)
def softmax_xent_fwd(logits, targets, ignore_index, probs, losses):
    """Row-wise stable softmax into `probs`, -log p[target] into `losses`; returns #counted rows."""
    n, c = logits.shape
    count = 0
    for i in range(n):
        m = logits[i, 0]
        for j in range(1, c):
            if logits[i, j] > m:
                m = logits[i, j]
        s = 0.0
        for j in range(c):
            e = math.exp(logits[i, j] - m)
            probs[i, j] = e
            s += e
        for j in range(c):
            probs[i, j] /= s
        t = targets[i]
        if t == ignore_index:
            losses[i] = 0.0
        else:
            losses[i] = -(logits[i, t] - m - math.log(s))
            count += 1
    return count


@njit(**_JIT)
def softmax_xent_bwd(probs, targets, ignore_index, scale, dlogits):
    """dlogits = (probs - onehot(target)) * scale; zero rows for ignored targets."""
    n, c = probs.shape
    for i in range(n):
        t = targets[i]
        if t == ignore_index:
            for j in range(c):
                dlogits[i, j] = 0.0
        else:
            for j in range(c):
                dlogits[i, j] = probs[i, j] * scale
            dlogits[i, t] -= scale


def softmax_xent_ref(logits, targets, ignore_index):
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    keep = targets != ignore_index
    losses = np.where(keep, -logp[np.arange(len(targets)), np.where(keep, targets, 0)], 0.0)
    return np.exp(logp), losses, int(keep.sum())


# ------------------------------------------------------------------------------- layer norm
@njit(**_JIT)
def layernorm_fwd(x, gamma, beta, eps, y, xhat, rstd):
    n, d = x.shape
    for i in range(n):
        mu = 0.0
        for j in range(d):
            mu += x[i, j]
        mu /= d
        var = 0.0
        for j in range(d):
            t = x[i, j] - mu
            var += t * t
        var /= d
        r = 1.0 / math.sqrt(var + eps)
        rstd[i] = r
        for j in range(d):
            h = (x[i, j] - mu) * r
            xhat[i, j] = h
            y[i, j] = h * gamma[j] + beta[j]


@njit(**_JIT)
def layernorm_bwd(dy, xhat, rstd, gamma, dx, dgamma, dbeta):
    n, d = dy.shape
    for i in range(n):
        a = 0.0  # mean(dxhat)
        b = 0.0  # mean(dxhat * xhat)
        for j in range(d):
            g = dy[i, j] * gamma[j]
            a += g
            b += g * xhat[i, j]
            dgamma[j] += dy[i, j] * xhat[i, j]
            dbeta[j] += dy[i, j]
        a /= d
        b /= d
        for j in range(d):
            dx[i, j] = rstd[i] * (dy[i, j] * gamma[j] - a - xhat[i, j] * b)


def layernorm_ref(x, gamma, beta, eps):
    mu = x.mean(axis=1, keepdims=True)
    var = x.var(axis=1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


# -------------------------------------------------------------------------------- embedding
@njit(**_JIT)
def embedding_bwd(ids, dy, dweight, padding_idx):
    """Scatter-add rows of dy into dweight[ids] (the padding row gets no gradient)."""
    for i in range(ids.shape[0]):
        k = ids[i]
        if k != padding_idx:
            for j in range(dy.shape[1]):
                dweight[k, j] += dy[i, j]


def embedding_bwd_ref(ids, dy, dweight, padding_idx):
    keep = ids != padding_idx
    np.add.at(dweight, ids[keep], dy[keep])


# ------------------------------------------------------------------------------------- LSTM
# The gate math of one LSTM step, fused into one pass over the (B, 4H) pre-activations that a
# single GEMM produced for all four gates (the fusion of Intel's "LSTM on Xeon" work: one big GEMM
# instead of four small ones, then one element-wise kernel instead of ~10 NumPy temporaries).
# Gate order i, f, g, o as in cuDNN / PyTorch. A zero in `mask` marks a padded step for that row:
# the state is carried through unchanged (so a padded tail does not disturb the final state).
@njit(**_JIT)
def _sig(v):
    if v >= 0:
        return 1.0 / (1.0 + math.exp(-v))
    e = math.exp(v)
    return e / (1.0 + e)


@njit(**_JIT)
def lstm_cell_fwd(gates, c_prev, h_prev, mask, c, h, tc):
    """gates (B, 4H) pre-activations, overwritten with the activations i, f, g, o."""
    n_h = c.shape[1]
    for b in range(gates.shape[0]):
        if mask[b] == 0:
            for j in range(n_h):
                c[b, j] = c_prev[b, j]
                h[b, j] = h_prev[b, j]
                tc[b, j] = 0.0
            continue
        for j in range(n_h):
            i = _sig(gates[b, j])
            f = _sig(gates[b, n_h + j])
            g = math.tanh(gates[b, 2 * n_h + j])
            o = _sig(gates[b, 3 * n_h + j])
            cc = f * c_prev[b, j] + i * g
            t = math.tanh(cc)
            gates[b, j] = i
            gates[b, n_h + j] = f
            gates[b, 2 * n_h + j] = g
            gates[b, 3 * n_h + j] = o
            c[b, j] = cc
            tc[b, j] = t
            h[b, j] = o * t


@njit(**_JIT)
def lstm_cell_bwd(acts, c_prev, tc, mask, dh, dc, dgates):
    """dh, dc: gradients w.r.t. this step's h and c; dc is overwritten with the grad w.r.t. c_prev.
    dgates (B, 4H) receives the grad w.r.t. the pre-activations (zero for padded rows)."""
    n_h = dc.shape[1]
    for b in range(acts.shape[0]):
        if mask[b] == 0:
            for j in range(4 * n_h):
                dgates[b, j] = 0.0
            continue  # dc passes through unchanged; the caller passes dh through
        for j in range(n_h):
            i = acts[b, j]
            f = acts[b, n_h + j]
            g = acts[b, 2 * n_h + j]
            o = acts[b, 3 * n_h + j]
            t = tc[b, j]
            dct = dc[b, j] + dh[b, j] * o * (1.0 - t * t)
            dgates[b, j] = dct * g * i * (1.0 - i)
            dgates[b, n_h + j] = dct * c_prev[b, j] * f * (1.0 - f)
            dgates[b, 2 * n_h + j] = dct * i * (1.0 - g * g)
            dgates[b, 3 * n_h + j] = dh[b, j] * t * o * (1.0 - o)
            dc[b, j] = dct * f


def lstm_cell_ref(gates, c_prev):
    """Plain NumPy step (no mask): returns (acts, c, h)."""
    n_h = c_prev.shape[1]
    i, f = sigmoid_ref(gates[:, :n_h]), sigmoid_ref(gates[:, n_h:2 * n_h])
    g, o = np.tanh(gates[:, 2 * n_h:3 * n_h]), sigmoid_ref(gates[:, 3 * n_h:])
    c = f * c_prev + i * g
    return np.concatenate([i, f, g, o], axis=1), c, o * np.tanh(c)
