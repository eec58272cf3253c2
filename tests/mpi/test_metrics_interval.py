"""The main job's metrics interval (job/metrics.py) on every rank: what it counts as communication
lies inside the time it counts as the interval."""
import time
from types import SimpleNamespace

import pytest

from disttrain.job.metrics import Interval
from disttrain.workloads import Batch


@pytest.mark.mpi
def test_the_records_own_collectives_are_not_communication_of_the_interval(comm):
    """A rank that logs late makes the others wait inside the record's loss allreduce. That wait
    was counted as blocking communication of the interval while the interval's clock had already
    stopped: comm_s and exposed_comm_s above step_time_s (the progress line showed 'comm 119% of
    step' at --pp 2 --log-every 1)."""
    ddp = SimpleNamespace(comm_seconds=0.0, exposed_comm_seconds=0.0, handoff_seconds=0.0,
                          wire_stats={"sent_bytes": 0, "ratio": 1.0})
    iv = Interval(ddp, 0)
    time.sleep(0.02)  # the step
    iv.add(1.0, Batch(None, None, 1, comm.Get_size()), 0.02, 0.0)
    if comm.Get_rank() == comm.Get_size() - 1:
        time.sleep(0.3)  # logs late: every other rank waits for it in the record
    rec = iv.record(1, "samples", SimpleNamespace(lr=0.1), 0)
    assert rec["comm_s"] is not None and rec["exposed_comm_s"] <= rec["comm_s"] <= rec["step_time_s"], rec
    assert rec["compute_s"] >= 0, rec
