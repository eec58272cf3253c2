"""Calibration and "auto": measured parameters agree on every rank; every choice is valid."""
import numpy as np
import pytest

import disttrain as dt
from disttrain.comm import costmodel


@pytest.mark.mpi
def test_calibrate_is_collective_and_identical_everywhere(comm, lean_calibration):
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


@pytest.mark.mpi
def test_saved_calibration_is_loaded_and_shared(comm, tmp_path_factory, lean_calibration):
    from disttrain.comm import config

    path = comm.bcast(str(tmp_path_factory.mktemp("cm") / "cm.json") if comm.Get_rank() == 0 else None)
    saved = dt.calibrate(save=path)
    before = config.update(costmodel_file=path)
    try:
        loaded = costmodel.ensure(dt.world().comm)  # rank 0 reads the file, every rank gets its values
        assert (loaded.alpha, loaded.beta, loaded.native) == (saved.alpha, saved.beta, [tuple(x) for x in saved.native])
        assert loaded.source == "measured"
    finally:
        config.restore(before)


@pytest.mark.mpi
def test_verbose_logs_every_collective(comm, capfd):
    dt.set_verbose(True)
    try:
        dt.allreduce(np.ones(4, np.float32), algorithm="ring")
        dt.broadcast(np.ones(2), algorithm="mpi")
        dt.alltoall(np.ones(comm.Get_size()), algorithm="pairwise")
    finally:
        dt.set_verbose(False)
    err = capfd.readouterr().err
    for line in ("allreduce ring 16 B", "broadcast mpi 16 B", "alltoall pairwise"):
        assert line in err, err
