"""Run pytest inside one MPI rank: rank 0 reports to the terminal, other ranks to log files.

Usage (what tests/test_mpi_suites.py runs): mpiexec -n N python tests/mpi/run.py LOGDIR [pytest args]
"""
import os
import sys

import pytest

if __name__ == "__main__":
    from mpi4py import MPI

    logdir, args = sys.argv[1], sys.argv[2:]
    rank = MPI.COMM_WORLD.Get_rank()
    if rank:
        # a rank that cannot open its log would exit before its peers' first collective: they hang
        os.makedirs(logdir, exist_ok=True)
        log = open(os.path.join(logdir, f"rank{rank}.log"), "w")
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    code = pytest.main(["--with-mpi", "-p", "no:cacheprovider", *args])
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(int(code))
