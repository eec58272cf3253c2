"""Finite-difference check of a layer's backward: the oracle every disttrain layer is tested with.

    report = dt.gradcheck(MyLayer(...), x)
    print(report)            # one line per parameter (and the input): max abs / rel error, pass/fail
    assert report.ok

The module runs in float64 (parameters and input are cast for the check and restored after), the
loss is <y, w> for a fixed random w, so d loss / d y = w exercises every output element, and each
gradient - the input's from ``backward``'s return, each parameter's from its ``.grad`` - is compared
with central differences (error O(eps^2)). It also checks the Module protocol: that ``backward``
*accumulates* into ``.grad`` (two backward passes give twice the gradient), which DataParallel
relies on (the gradient is a view into a communication bucket).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class GradcheckReport:
    """Per checked array: (name, max abs error, max relative error, ok)."""

    rows: list = field(default_factory=list)
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(r[3] for r in self.rows)

    def __str__(self) -> str:
        lines = [f"{'array':<32} {'max abs err':>12} {'max rel err':>12}  result"]
        lines += [f"{n:<32} {a:>12.3e} {r:>12.3e}  {'ok' if ok else 'FAIL'}" for n, a, r, ok in self.rows]
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


def numeric_grad(loss, arr: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """d loss() / d arr by central differences, perturbing arr in place one element at a time."""
    num = np.zeros_like(arr)
    for i in np.ndindex(arr.shape):
        old = arr[i]
        arr[i] = old + eps
        lp = loss()
        arr[i] = old - eps
        lm = loss()
        arr[i] = old
        num[i] = (lp - lm) / (2 * eps)
    return num


def _backward(module, dy, split: bool):
    """The module's backward, whole or as B (``backward_input``) then W (``backward_weight``)."""
    if not split:
        return module.backward(dy)
    dx = module.backward_input(dy)
    module.backward_weight()
    return dx


def gradcheck(module, x, eps: float = 1e-6, rtol: float = 1e-5, atol: float = 1e-7, seed: int = 0,
              check_input: bool = True, split: bool = False) -> GradcheckReport:
    """Compare `module`'s backward with central finite differences in float64.

    Args:
        module: a disttrain Module (forward(x) -> y, backward(dy) -> dx, parameters()).
        x: an input batch (float arrays are cast to float64 for the check; integer inputs, e.g. token
            ids, are passed as they are and get no input gradient).
        eps, rtol, atol: step and tolerances (|analytic - numeric| <= atol + rtol * |numeric|).
        check_input: also check the gradient with respect to x (layers that skip it, e.g.
            ``Linear(input_grad=False)``, return None and are not checked).
        split: check the zero-bubble protocol instead of ``backward``: the input gradient from
            ``backward_input`` (B) and the parameter gradients after ``backward_weight`` (W), each
            against finite differences.

    Returns:
        A GradcheckReport; ``report.ok`` is True when every gradient matches.

    Example:
        >>> rep = dt.gradcheck(nn.Linear(4, 3), np.random.default_rng(0).standard_normal((5, 4)))
        >>> assert rep.ok, rep
    """
    params = module.parameters()
    saved = [(p, p.data, p.grad) for p in params]
    rep = GradcheckReport()
    try:
        for p in params:
            p.data = p.data.astype(np.float64)
            p.grad = np.zeros_like(p.data)
        xf = x.astype(np.float64) if isinstance(x, np.ndarray) and x.dtype.kind == "f" else x
        y = module.forward(xf)
        w = np.random.default_rng(seed).standard_normal(np.shape(y))

        def loss():
            return float(np.sum(module.forward(xf) * w))

        module.forward(xf)
        dx = _backward(module, w.copy(), split)
        analytic = {p.name: p.grad.copy() for p in params}
        # the protocol: a second backward accumulates
        module.forward(xf)
        _backward(module, w.copy(), split)
        for p in params:
            if not np.allclose(p.grad, 2 * analytic[p.name], rtol=1e-9, atol=1e-12):
                rep.problems.append(f"backward does not accumulate into {p.name!r}.grad (assign with += or "
                                    "np.add(..., out=p.grad); DataParallel's gradient is a view into a bucket)")
        checks = [(p.name, p.data, analytic[p.name]) for p in params]
        if check_input and dx is not None and isinstance(xf, np.ndarray) and xf.dtype.kind == "f":
            checks.append(("input", xf, dx))
        for name, arr, got in checks:
            num = numeric_grad(loss, arr, eps)
            err = np.abs(got - num)
            rel = err / np.maximum(np.abs(num), 1e-12)
            ok = bool(np.all(err <= atol + rtol * np.abs(num)))
            rep.rows.append((name, float(err.max(initial=0.0)), float(rel.max(initial=0.0)), ok))
    finally:
        for p, data, grad in saved:
            p.data, p.grad = data, grad
    return rep
