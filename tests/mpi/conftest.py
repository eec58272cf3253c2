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
    from disttrain.comm.config import settings

    saved = (settings.validate, settings.segment_bytes, settings.ps_servers)
    yield
    settings.validate, settings.segment_bytes, settings.ps_servers = saved


def rank_rng(comm, salt=0):
    return np.random.default_rng(1000 * salt + comm.Get_rank())
