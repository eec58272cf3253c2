"""Optimizers against scalar implementations of their papers' update rules; schedules' values."""
import math

import numpy as np
import pytest

from disttrain import nn, optim


def params(seed=0):
    rng = np.random.default_rng(seed)
    return [nn.Parameter(rng.standard_normal((3, 2)), "w"), nn.Parameter(rng.standard_normal(4), "b")]


def grads_for(step, p):
    return np.sin(np.arange(p.data.size).reshape(p.data.shape) + step)  # deterministic, changes per step


def run(opt_cls, steps=6, **kw):
    ps = params()
    opt = opt_cls(ps, **kw)
    for s in range(steps):
        for p in ps:
            p.grad[...] = grads_for(s, p)
        opt.step()
        opt.zero_grad()
    return ps


def scalar_sgd(w, steps, lr, momentum, nesterov, wd, idx, shape):
    v = None
    for s in range(steps):
        g = math.sin(idx + s) + wd * w
        if momentum:
            v = g if v is None else momentum * v + g
            g = g + momentum * v if nesterov else v
        w -= lr * g
    return w


@pytest.mark.parametrize("momentum,nesterov,wd", [(0, False, 0), (0.9, False, 0), (0.9, True, 1e-2), (0.5, False, 0.1)])
def test_sgd_matches_scalar_rule(momentum, nesterov, wd):
    got = run(optim.SGD, lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    for p0, p in zip(params(), got):
        want = [scalar_sgd(w, 6, 0.1, momentum, nesterov, wd, i, p0.data.shape) for i, w in enumerate(p0.data.ravel())]
        np.testing.assert_allclose(p.data.ravel(), want, rtol=1e-12)


def scalar_adam(w, steps, lr, b1, b2, eps, wd, decoupled, idx, lamb=False):
    m = v = 0.0
    for s in range(1, steps + 1):
        g = math.sin(idx + s - 1)
        if wd and not decoupled and not lamb:
            g += wd * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1 ** s)) / (math.sqrt(v / (1 - b2 ** s)) + eps)
        if decoupled:
            w -= lr * wd * w
        w -= lr * u
    return w


@pytest.mark.parametrize("cls,wd", [(optim.Adam, 0.0), (optim.Adam, 0.05), (optim.AdamW, 0.05)])
def test_adam_and_adamw_match_scalar_rule(cls, wd):
    got = run(cls, lr=0.01, weight_decay=wd)
    for p0, p in zip(params(), got):
        want = [scalar_adam(w, 6, 0.01, 0.9, 0.999, 1e-8, wd, cls is optim.AdamW, i) for i, w in enumerate(p0.data.ravel())]
        np.testing.assert_allclose(p.data.ravel(), want, rtol=1e-10)


def test_lamb_scales_adam_direction_by_layer_trust_ratio():
    ps = params()
    w0 = [p.data.copy() for p in ps]
    opt = optim.LAMB(ps, lr=0.01, weight_decay=0.0)
    for p in ps:
        p.grad[...] = grads_for(0, p)
    opt.step()
    for p, w in zip(ps, w0):
        u = np.sign(grads_for(0, p)) * (1 - 1e-6)  # first Adam step: m_hat / sqrt(v_hat) = sign(g) (eps aside)
        step = w - p.data
        np.testing.assert_allclose(np.linalg.norm(step), 0.01 * np.linalg.norm(w), rtol=1e-4)  # ||step|| = lr ||w||
        np.testing.assert_allclose(step / np.linalg.norm(step), u / np.linalg.norm(u), rtol=1e-4)


@pytest.mark.parametrize("cls,kw", [(optim.SGD, dict(lr=0.1, momentum=0.9)), (optim.Adam, dict(lr=0.05)),
                                    (optim.AdamW, dict(lr=0.05, weight_decay=0.0)), (optim.LAMB, dict(lr=0.05, weight_decay=0.0))])
def test_every_optimizer_minimises_a_quadratic(cls, kw):
    p = nn.Parameter(np.full(5, 3.0), "x")
    opt = cls([p], **kw)
    for _ in range(300):
        p.grad[...] = 2 * (p.data - 1.0)
        opt.step()
    assert np.allclose(p.data, 1.0, atol=0.05), p.data


def test_schedules():
    opt = optim.SGD(params(), lr=1.0)
    s = optim.WarmupCosine(opt, total_steps=10, warmup_steps=4)
    lrs = [opt.lr]
    for _ in range(10):
        s.step()
        lrs.append(opt.lr)
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and abs(lrs[-1]) < 1e-12 and all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    opt2 = optim.SGD(params(), lr=1.0)
    s2 = optim.WarmupStep(opt2, step_size=3, gamma=0.5)
    seen = []
    for _ in range(7):
        seen.append(opt2.lr)
        s2.step()
    assert seen == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]
    assert optim.linear_scaling(0.1, 1024) == pytest.approx(0.4)


def test_bad_hyperparameters():
    with pytest.raises(ValueError):
        optim.SGD(params(), lr=0)
    with pytest.raises(ValueError):
        optim.SGD(params(), lr=0.1, nesterov=True)
    with pytest.raises(ValueError):
        optim.SGD([], lr=0.1)


@pytest.mark.parametrize("momentum,nesterov,wd,first", [(0.0, False, 0.0, False), (0.9, False, 0.0, True),
                                                        (0.9, True, 1e-2, False), (0.5, False, 0.1, False)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_sgd_kernel_matches_numpy_twin(momentum, nesterov, wd, first, dtype):
    from disttrain.optim.kernels import sgd_step, sgd_step_ref
    rng = np.random.default_rng(3)
    w, g, v = (rng.standard_normal(257).astype(dtype) for _ in range(3))
    w2, v2 = w.copy(), v.copy()
    sgd_step(w, g, v, dtype(0.1), dtype(momentum), dtype(wd), nesterov, first)
    sgd_step_ref(w2, g, v2, dtype(0.1), dtype(momentum), dtype(wd), nesterov, first)
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(w, w2, rtol=tol, atol=tol)
    np.testing.assert_allclose(v, v2, rtol=tol, atol=tol)
