"""The pipeline's shared-memory channel (parallel/pipeline/channel.py) as a job sees it: across
emulated nodes only the pairs on one node use it (the others MPI) and the result is the one-process
one; a stage that raises in a known-shape step, while its neighbours wait in the channel, ends the
job on every rank."""
import time

import pytest

from ._mpirun import run

SCRIPT = """
import sys
import numpy as np
import disttrain as dt
from disttrain import nn
from disttrain.parallel.pipeline import Pipeline

dt.init()
r, p = dt.rank(), dt.size()
MODE = sys.argv[1]

def layers():
    return [nn.Linear(6, 6, rng=np.random.default_rng(k), dtype=np.float64, input_grad=k > 0) for k in range(p)]

class RaiseAt(nn.Module):
    calls = 0
    def forward(self, x):
        RaiseAt.calls += 1
        if MODE == "raise" and r == p - 1 and RaiseAt.calls == 5:  # the second (known-shape) step
            raise RuntimeError(f"rank {r} raises mid-step")
        return x
    def backward(self, dy):
        return dy

stage = nn.Sequential(layers()[r], RaiseAt())
loss = nn.SoftmaxCrossEntropy()
pipe = Pipeline(stage, dt.new_group(range(p)), loss if r == p - 1 else None, "1f1b", micro_batches=3, uneven=True,
                transport="shm")
rng = np.random.default_rng(1)
x, y = rng.standard_normal((7, 6)), rng.integers(0, 6, 7)
for _ in range(2):
    stage.zero_grad()
    got = pipe.step(x, y)
ref = nn.Sequential(*layers())
want = loss.forward(ref.forward(x), y)
ref.backward(loss.backward())
assert abs(got - want) < 1e-12, (got, want)
for q, q_ref in zip(stage.parameters(), ref.layers[r].parameters()):
    np.testing.assert_allclose(q.grad, q_ref.grad, rtol=1e-12, atol=1e-14)
node = [0, 0, 1][r]  # DISTTRAIN_FAKE_NODES=2,1: ranks 0 and 1 on one node, rank 2 on another
shm_out = sorted({k[0] for k in pipe.net._outbound})
shm_in = sorted({plan[4] for plan in pipe.net._inbound.values()})
assert shm_out == [q for q in (r - 1, r + 1) if 0 <= q < p and [0, 0, 1][q] == node], shm_out
assert shm_in == shm_out, (shm_in, shm_out)
print(f"OK rank {r} channel to {shm_out}", flush=True)
"""


def _job(tmp_path, mode, n=3):
    script = tmp_path / "chan.py"
    script.write_text(SCRIPT)
    t = time.monotonic()
    res = run(n, [str(script), mode], timeout=90, env={"DISTTRAIN_COSTMODEL": "defaults", "DISTTRAIN_FAKE_NODES": "2,1"})
    return res, time.monotonic() - t


def test_across_emulated_nodes_only_the_pairs_on_one_node_use_the_channel(tmp_path):
    res, _ = _job(tmp_path, "plain")
    assert res.returncode == 0, res.stdout[-3000:]
    for line in ("OK rank 0 channel to [1]", "OK rank 1 channel to [0]", "OK rank 2 channel to []"):
        assert line in res.stdout, res.stdout[-3000:]


def test_a_stage_that_raises_while_its_neighbours_wait_in_the_channel_ends_the_job(tmp_path):
    res, took = _job(tmp_path, "raise")
    assert "raises mid-step" in res.stdout, res.stdout[-3000:]
    assert res.returncode not in (0, -9), res.stdout[-3000:]  # -9: our timeout, a hang
    assert took < 60 and "OK rank" not in res.stdout, res.stdout[-3000:]
