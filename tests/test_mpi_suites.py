"""Drive the MPI test suites (tests/mpi/) under mpiexec at 1, 2, 3, 4, 5 and 8 ranks.

Each run has a hard time limit; a rank that hangs fails the test instead of stalling CI. Ranks
other than 0 log to files that are printed when a run fails.
"""
import glob
import os
import sys

import pytest

from ._mpirun import run

HERE = os.path.dirname(os.path.abspath(__file__))
RANKS = [1, 2, 3, 4, 5, 8]


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels():
    """Compile (or load) the numba kernels once here, not in 8 ranks at once."""
    from disttrain.comm import kernels

    kernels.warmup()


@pytest.mark.parametrize("n", RANKS)
def test_mpi_suite(n, tmp_path):
    res = run(n, [os.path.join(HERE, "mpi", "run.py"), str(tmp_path), "-q", "-x", "--no-header",
                  "-W", "error::RuntimeWarning", os.path.join(HERE, "mpi")], timeout=150 + 45 * n,
              env={"DISTTRAIN_TEST_ABORT_ON_FAIL": "1"})
    if res.returncode != 0:
        logs = "".join(f"\n----- {os.path.basename(f)} -----\n" + open(f).read()[-4000:]
                       for f in sorted(glob.glob(str(tmp_path / "rank*.log"))))
        pytest.fail(f"mpiexec -n {n} failed (rc={res.returncode}):\n{res.stdout[-8000:]}{logs}", pytrace=False)
    last = [ln for ln in res.stdout.splitlines() if " passed" in ln]
    assert last and "failed" not in last[-1], res.stdout[-3000:]
    sys.stdout.write(f"\n[{n} ranks] {last[-1].strip()}")
