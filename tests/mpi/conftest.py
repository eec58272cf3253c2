import os
import sys

import numpy as np
import pytest

import disttrain as dt


@pytest.fixture(scope="session")
def comm():
    """The raw MPI world communicator: the oracle's side of every comparison."""
    dt.init()
    from mpi4py import MPI

    return MPI.COMM_WORLD


@pytest.fixture(autouse=True)
def _defaults():
    """Every test starts from the same settings on every rank."""
    from disttrain.comm import config

    saved = config.settings
    yield
    config.restore(saved)


@pytest.fixture
def lean_calibration(monkeypatch):
    """dt.calibrate on small working sets and few repetitions: the tests check the measurement's
    logic (collective, identical on every rank, saved/loaded, installed per group), not its
    accuracy - the full one moves 32 MiB working sets and a 64 MiB MPI_Allreduce, seconds per
    call at 8 oversubscribed ranks. Both branches of the native table stay (sizes below and from
    256 KiB)."""
    from disttrain.comm import costmodel

    monkeypatch.setattr(costmodel, "LARGE", 4 << 20)
    monkeypatch.setattr(costmodel, "NET_BYTES", 1 << 20)
    monkeypatch.setattr(costmodel, "NATIVE_SIZES", (8, 1 << 12, 1 << 16, 1 << 18, 1 << 20))
    timed = costmodel.timed
    monkeypatch.setattr(costmodel, "timed",
                        lambda fn, reps, rounds=5, stat=np.median: timed(fn, max(1, reps // 10), 2, stat))


def rank_rng(comm, salt=0):
    return np.random.default_rng(1000 * salt + comm.Get_rank())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that fails on some ranks leaves the others blocked in its next collective: with
    DISTTRAIN_TEST_ABORT_ON_FAIL=1 (set by tests/test_mpi_suites.py) the first failure on any rank
    prints its report and aborts the whole job, so a broken algorithm fails fast instead of hanging
    until the driver's timeout."""
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and os.environ.get("DISTTRAIN_TEST_ABORT_ON_FAIL") == "1":
        from mpi4py import MPI

        sys.stderr.write(f"\n[rank {MPI.COMM_WORLD.Get_rank()}] FAILED {item.nodeid}\n{rep.longreprtext}\n")
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)
