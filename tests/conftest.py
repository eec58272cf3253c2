"""Two kinds of tests live here.

- tests/*.py run in one plain process (kernels, trees, cost model, registry) and drive the MPI
  suites: tests/test_mpi_suites.py launches ``mpiexec -n N`` for N in 1, 2, 3, 4, 5, 8 over
  tests/mpi/ (each file at the counts it declares, else all), each run under a hard timeout so
  that a hang is a failure, not a stuck CI job.
- tests/mpi/*.py run inside every rank under mpiexec (pytest-mpi's ``--with-mpi``).
"""
import os
from pathlib import Path

import pytest

from disttrain.comm import fused, kernels, node, shm
from disttrain.compression import kernels as compression_kernels
from disttrain.parallel import shared_buckets

_MPI_DIR = Path(__file__).parent / "mpi"
#: the library's own warm-ups: every numba specialization the collectives, DataParallel, the
#: compressors and the shared buckets use
WARMUPS = (kernels.warmup, fused.warmup, shm.warmup, node.warmup, compression_kernels.warmup, shared_buckets.warmup)


def pytest_ignore_collect(collection_path, config):
    # The MPI suites only make sense inside mpiexec; the outer run launches them itself.
    if collection_path.is_relative_to(_MPI_DIR) and not config.getoption("--with-mpi", default=False):
        return True
    return None


os.environ.setdefault("DISTTRAIN_COSTMODEL", "defaults")


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels(request):
    """Compile (or load from numba's cache) the library's kernels once, in this process, before
    any test launches ranks. On a fresh checkout (CI) every rank of the first multi-rank jobs
    compiled the same kernels at once: dt.init + one allreduce on 3 ranks with an empty
    NUMBA_CACHE_DIR took 10.9 s of CPU, 2.4 s with the cache filled (all six warm-ups here: ~12 s
    of CPU once, ~0.3 s from the cache). Inside the MPI suites (--with-mpi) the ranks load what
    this process compiled."""
    if not request.config.getoption("--with-mpi", default=False):
        for warm in WARMUPS:
            warm()
