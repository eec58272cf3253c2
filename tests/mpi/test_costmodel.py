"""Calibration and "auto": measured parameters agree on every rank; every choice is valid."""
import numpy as np
import pytest

import disttrain as dt
from disttrain.comm import costmodel


@pytest.mark.mpi
def test_calibrate_is_collective_and_identical_everywhere(comm):
    c = dt.calibrate()
    assert c.p == comm.Get_size() and c.source == "measured"
    assert c.alpha > 0 and c.beta > 0 and c.gamma > 0 and len(c.native) >= 5
    assert all(t > 0 for _, t in c.native)
    assert len({(c.alpha, c.beta, c.gamma, tuple(c.native))} | set(
        (a, b, g, tuple(n)) for a, b, g, n in comm.allgather((c.alpha, c.beta, c.gamma, tuple(c.native))))) == 1


@pytest.mark.mpi
def test_auto_choices_are_valid_and_correct(comm):
    p = comm.Get_size()
    for nbytes in [0, 4, 64, 4096, 1 << 16, 1 << 20, 1 << 22]:
        name = costmodel.choose("allreduce", dt.world().comm, nbytes, np.dtype(np.float32))
        assert name.partition(":")[0] in dt.ALLREDUCE_ALGORITHMS
        assert costmodel.choose("alltoall", dt.world().comm, nbytes, np.dtype(np.uint8)) in dt.ALLTOALL_ALGORITHMS
        n = nbytes // 4
        assert np.all(dt.allreduce(np.ones(n, np.float32)) == p)
    choices = comm.allgather([costmodel.choose("allreduce", dt.world().comm, 1 << k, np.dtype(np.float32))
                              for k in range(27)])
    assert all(c == choices[0] for c in choices), "every rank must pick the same algorithm"
