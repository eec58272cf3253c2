"""A custom layer for disttrain, checked with dt.gradcheck, then trained under DataParallel.

    launchers/local.sh 2 examples/custom_layer.py

The Module protocol (docs/ARCHITECTURE.md sec. 5): ``forward(x)`` keeps what backward needs;
``backward(dy)`` returns the input gradient and ACCUMULATES each parameter's gradient into
``p.grad`` (``p.grad += ...``: under DataParallel ``.grad`` is a view into a communication bucket, so
assigning a new array would silently leave it out of the average - disttrain raises instead);
containers call ``self._grads_ready(child)`` after each child's backward so that buckets start
early (nn.Sequential does it for you).
"""
import numpy as np

import disttrain as dt
from disttrain import nn, optim


class ScaledTanh(nn.Module):
    """y = a * tanh(b * x) with learned per-feature a and b (LeCun's scaled tanh, learnable)."""

    def __init__(self, features: int, dtype=np.float32):
        self.a = nn.Parameter(np.full(features, 1.7159, dtype))
        self.b = nn.Parameter(np.full(features, 2.0 / 3.0, dtype))

    def forward(self, x):
        self._x = x
        self._t = np.tanh(self.b.data * x)
        return self.a.data * self._t

    def backward(self, dy):
        dt_ = dy * self.a.data * (1 - self._t ** 2)  # d y / d (b x)
        self.a.grad += np.sum(dy * self._t, axis=0)    # accumulate, never assign
        self.b.grad += np.sum(dt_ * self._x, axis=0)
        return dt_ * self.b.data


def main():
    dt.init()
    rng = np.random.default_rng(0)
    report = dt.gradcheck(ScaledTanh(5), rng.standard_normal((4, 5)))
    if dt.rank() == 0:
        print(report)
    assert report.ok, report

    model = nn.Sequential(nn.Linear(8, 16, rng=np.random.default_rng(1)), ScaledTanh(16),
                          nn.Linear(16, 1, init="xavier", rng=np.random.default_rng(2)))
    dt.broadcast_parameters(model)
    ddp = dt.DataParallel(model)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.MSE()
    w_true = np.random.default_rng(3).standard_normal((8, 1)).astype(np.float32)
    data = np.random.default_rng(10 + dt.rank())  # each rank its own samples
    for step in range(200):
        x = data.standard_normal((32, 8)).astype(np.float32)
        loss = loss_fn.forward(ddp.forward(x), np.tanh(x @ w_true))
        ddp.backward(loss_fn.backward())
        opt.step()
        opt.zero_grad()
    final = float(dt.allreduce(np.array([loss]), op="avg")[0])
    if dt.rank() == 0:
        print(f"custom layer trained under DataParallel on {dt.size()} ranks: loss {final:.4f}")
    assert final < 0.05, final


if __name__ == "__main__":
    main()
