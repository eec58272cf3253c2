"""Drive the MPI test suites (tests/mpi/) under mpiexec at 1, 2, 3, 4, 5 and 8 ranks.

Each run has a hard time limit; a rank that hangs fails the test instead of stalling CI. Ranks
other than 0 log to files that are printed when a run fails.

Which files run at which rank counts: every file runs at all of RANKS unless it declares, at
module level, ``MPI_RANKS = (...)`` - the counts at which its tests have rank-dependent behaviour
(read here from the file's source, without importing it). The rule a declaration must keep
(checked by ``test_every_file_runs_at_the_counts_the_rule_asks_for``): 1 (the degenerate group),
2 (the smallest real exchange), 3 (odd, not a power of two) and 5 (odd, above 4), plus 4 and 8
where the file has layouts or partitions that only those counts reach. A run by hand (``mpiexec -n
N python tests/mpi/run.py LOGDIR tests/mpi/test_x.py``) still runs any file at any count.
"""
import ast
import glob
import os
import sys

import pytest

from ._mpirun import run

HERE = os.path.dirname(os.path.abspath(__file__))
RANKS = (1, 2, 3, 4, 5, 8)
#: what every declaration keeps: the degenerate group, the smallest real exchange, two odd counts
REQUIRED = {1, 2, 3, 5}


def declared_ranks(path: str) -> tuple:
    """The rank counts a tests/mpi file runs at: its module-level MPI_RANKS tuple, else RANKS."""
    for node in ast.parse(open(path).read(), path).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "MPI_RANKS" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    return RANKS


def suite_files(n: int) -> list:
    """The tests/mpi files the n-rank run collects."""
    return [f for f in sorted(glob.glob(os.path.join(HERE, "mpi", "test_*.py"))) if n in declared_ranks(f)]


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels():
    """Compile (or load) the numba kernels once here, not in 8 ranks at once."""
    from disttrain.comm import kernels

    kernels.warmup()


def test_every_file_runs_at_the_counts_the_rule_asks_for():
    files = sorted(glob.glob(os.path.join(HERE, "mpi", "test_*.py")))
    assert files
    for f in files:
        got = declared_ranks(f)
        assert set(got) <= set(RANKS) and REQUIRED <= set(got) and len(set(got)) == len(got), \
            f"{os.path.basename(f)}: MPI_RANKS = {got} must hold {sorted(REQUIRED)} and only counts of {RANKS}"
    assert all(suite_files(n) for n in RANKS)


@pytest.mark.parametrize("n", RANKS)
def test_mpi_suite(n, tmp_path):
    res = run(n, [os.path.join(HERE, "mpi", "run.py"), str(tmp_path), "-q", "-x", "--no-header",
                  "-W", "error::RuntimeWarning", *suite_files(n)], timeout=150 + 45 * n,
              env={"DISTTRAIN_TEST_ABORT_ON_FAIL": "1"})
    if res.returncode != 0:
        logs = "".join(f"\n----- {os.path.basename(f)} -----\n" + open(f).read()[-4000:]
                       for f in sorted(glob.glob(str(tmp_path / "rank*.log"))))
        pytest.fail(f"mpiexec -n {n} failed (rc={res.returncode}):\n{res.stdout[-8000:]}{logs}", pytrace=False)
    last = [ln for ln in res.stdout.splitlines() if " passed" in ln]
    assert last and "failed" not in last[-1], res.stdout[-3000:]
    sys.stdout.write(f"\n[{n} ranks] {last[-1].strip()}")
