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
