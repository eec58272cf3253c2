"""Two kinds of tests live here.

- tests/*.py run in one plain process (kernels, trees, cost model, registry) and drive the MPI
  suites: tests/test_mpi_suites.py launches ``mpiexec -n N`` for N in 1, 2, 3, 4, 5, 8 over
  tests/mpi/ (each file at the counts it declares, else all), each run under a hard timeout so
  that a hang is a failure, not a stuck CI job.
- tests/mpi/*.py run inside every rank under mpiexec (pytest-mpi's ``--with-mpi``).
"""
import os
from pathlib import Path

_MPI_DIR = Path(__file__).parent / "mpi"


def pytest_ignore_collect(collection_path, config):
    # The MPI suites only make sense inside mpiexec; the outer run launches them itself.
    if collection_path.is_relative_to(_MPI_DIR) and not config.getoption("--with-mpi", default=False):
        return True
    return None


os.environ.setdefault("DISTTRAIN_COSTMODEL", "defaults")
