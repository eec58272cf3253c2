"""The runnable examples (examples/) run in the suite: a custom training loop with checkpoint
save / restore through public APIs, and a custom layer checked with dt.gradcheck."""
import os

import numpy as np
import pytest

from ._mpirun import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("example,expect", [
    ("custom_layer.py", "custom layer trained under DataParallel on 2 ranks"),
    ("custom_loop.py", "resumed run identical to the uninterrupted one: True"),
])
def test_example_runs(example, expect, tmp_path):
    res = run(2, [os.path.join(ROOT, "examples", example)], timeout=180, env={"DISTTRAIN_COSTMODEL": "defaults"})
    assert res.returncode == 0 and expect in res.stdout, res.stdout[-4000:]


def test_gradcheck_reports_a_wrong_and_a_non_accumulating_backward():
    import disttrain as dt
    from disttrain import nn

    x = np.random.default_rng(0).standard_normal((3, 4))
    assert dt.gradcheck(nn.Linear(4, 2), x).ok

    class Wrong(nn.Linear):
        def backward(self, dy):
            dx = super().backward(dy)
            self.weight.grad *= 1.01  # off by 1%
            return dx

    rep = dt.gradcheck(Wrong(4, 2), x)
    assert not rep.ok and any(name == "weight" and not ok for name, _, _, ok in rep.rows), str(rep)

    class Assigns(nn.Linear):
        def backward(self, dy):
            self.weight.grad[...] = self._x.T @ dy  # assigns: a second backward does not add up
            self.bias.grad += dy.sum(axis=0)
            return dy @ self.weight.data.T

    rep = dt.gradcheck(Assigns(4, 2), x)
    assert not rep.ok and "does not accumulate into 'weight'" in str(rep), str(rep)
