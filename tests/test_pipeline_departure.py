"""A pipeline stage that leaves the job mid-step (sys.exit: MPI_Finalize, no exception) ends the
job with a message naming it - its neighbour waiting in a pipeline receive used to wait forever
(the receive is point-to-point: no group call count for the stall inspector's departure check)."""
import time

import pytest

from ._mpirun import run

SCRIPT = """
import sys
import numpy as np
import disttrain as dt
from disttrain import nn, stall
from disttrain.parallel.pipeline import Pipeline

dt.init()
# the grace a point-to-point wait gets after its source left (5 s: a message sent before leaving
# may still arrive on a loaded host); here nothing is in flight - the test waited 5 s per run
stall.P2P_DEPARTED_GRACE = 1.0
r, p = dt.rank(), dt.size()
LEAVE_AT = int(sys.argv[1])  # the last stage leaves in its LEAVE_AT-th forward
TRANSPORT = sys.argv[2]

class LeaveAt(nn.Module):
    calls = 0
    def forward(self, x):
        LeaveAt.calls += 1
        if r == p - 1 and LeaveAt.calls == LEAVE_AT:
            print(f"rank {r} leaves mid-step", flush=True)
            sys.exit(0)
        return x
    def backward(self, dy):
        return dy

rng = np.random.default_rng(0)
stage = nn.Sequential(nn.Linear(6, 6, rng=rng, dtype=np.float64), LeaveAt())
pipe = Pipeline(stage, dt.new_group(range(p)), nn.SoftmaxCrossEntropy() if r == p - 1 else None,
                "1f1b", micro_batches=4, transport=TRANSPORT)
x, y = rng.standard_normal((8, 6)), rng.integers(0, 6, 8)
for _ in range(3):
    pipe.step(x, y)
print("UNREACHABLE", flush=True)
"""


# the first step (headers), the second (known shapes) through MPI and through the shm channel
@pytest.mark.parametrize("n,leave_at,transport", [(2, 2, "mpi"), (3, 6, "mpi"), (3, 6, "shm")])
def test_a_stage_that_leaves_mid_step_ends_the_job(n, leave_at, transport, tmp_path):
    script = tmp_path / "leave.py"
    script.write_text(SCRIPT)
    t = time.monotonic()
    res = run(n, [str(script), str(leave_at), transport], timeout=60, env={"DISTTRAIN_COSTMODEL": "defaults"})
    took = time.monotonic() - t
    assert f"rank {n - 1} leaves mid-step" in res.stdout, res.stdout[-3000:]
    assert res.returncode not in (0, -9), res.stdout[-3000:]  # -9: our timeout, a hang
    assert took < 40, f"took {took:.0f} s"
    assert f"rank {n - 1} has left the job" in res.stdout and "pipeline recv" in res.stdout, res.stdout[-3000:]
    if leave_at == 6 and transport == "shm":  # a known-shape step: its neighbour waits in the channel
        assert "pipeline shm channel" in res.stdout, res.stdout[-3000:]
    assert "UNREACHABLE" not in res.stdout
