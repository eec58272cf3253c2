"""The schedule fuzzer (tests/fuzz_program.py) in the suite: 720 random programs over 2-5 ranks,
50 with tests/fuzz_extra.py's half (the MPI library as oracle, 0-d and zero-byte rows, every dtype,
groups and sub-meshes made between async calls, argument faults of every family), and jobs in
which one rank leaves at a random point. (attack7: 1,000 programs at 2-5 ranks became 720 to pay
for the extra run; the extra half at 25% ran 4,000+ programs by hand, docs/ARCHITECTURE.md sec. 7.) Seeds are fixed (reproducible); set
DISTTRAIN_FUZZ_SEED to explore others. A failure prints the seed and program number to replay:

    mpiexec -n P python tests/fuzz_program.py SEED PROGRAMS
"""
import os
import re
import time

import pytest

from ._mpirun import run

HERE = os.path.dirname(os.path.abspath(__file__))
BASE = int(os.environ.get("DISTTRAIN_FUZZ_SEED", "20261126"))
ENV = {"DISTTRAIN_COSTMODEL": "defaults"}
SUMMARY = re.compile(r"fuzz: (\d+) programs, (\d+) collectives, (\d+) faults, seed (\d+), (\d+) failures")


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_fuzz_programs_agree_with_numpy_and_faults_raise_everywhere(n, tmp_path):
    seed = BASE + n
    res = run(n, [os.path.join(HERE, "fuzz_program.py"), str(seed), "180", "--extra", "0"], timeout=150,
              env={**ENV, "DISTTRAIN_FLIGHT_DIR": str(tmp_path)})
    summary = SUMMARY.search(res.stdout)
    assert res.returncode == 0 and summary, f"seed {seed} at {n} ranks:\n{res.stdout[-6000:]}"
    programs, calls, faults, _, failures = map(int, summary.groups())
    assert failures == 0, res.stdout[-6000:]
    assert programs == 180 and calls > 720 and faults > 36, summary.group(0)


def test_fuzz_extra_half_agrees_with_the_mpi_library(tmp_path):
    """fuzz_extra at half the operations, 3 ranks (odd), on emulated nodes of 2 and 1 ranks (the
    two-level algorithms by name, uneven): results equal the MPI library's own collective."""
    seed = BASE + 7
    res = run(3, [os.path.join(HERE, "fuzz_program.py"), str(seed), "50", "--extra", "0.5"], timeout=150,
              env={**ENV, "DISTTRAIN_FLIGHT_DIR": str(tmp_path), "DISTTRAIN_FAKE_NODES": "2,1"})
    summary = SUMMARY.search(res.stdout)
    assert res.returncode == 0 and summary, f"seed {seed} at 3 ranks:\n{res.stdout[-6000:]}"
    assert int(summary.group(5)) == 0 and int(summary.group(1)) == 50, res.stdout[-6000:]


@pytest.mark.parametrize("n,nodes", [(4, "2"), (5, "3,2")])
def test_fuzz_on_emulated_nodes(n, nodes, tmp_path):
    """The same programs with the ranks split into emulated nodes (topology.py): the node and slice
    communicators of every group, the two-level algorithms and their `auto` choice among random,
    overlapping groups that span parts of nodes."""
    seed = BASE + 100 * n
    res = run(n, [os.path.join(HERE, "fuzz_program.py"), str(seed), "120"], timeout=150,
              env={**ENV, "DISTTRAIN_FLIGHT_DIR": str(tmp_path), "DISTTRAIN_FAKE_NODES": nodes})
    summary = SUMMARY.search(res.stdout)
    assert res.returncode == 0 and summary, f"seed {seed} at {n} ranks, nodes {nodes}:\n{res.stdout[-6000:]}"
    assert int(summary.group(5)) == 0 and int(summary.group(1)) == 120, res.stdout[-6000:]


@pytest.mark.parametrize("n,how", [(3, "exit"), (4, "raise"), (5, "exit"), (2, "raise")])
def test_fuzz_a_rank_that_leaves_ends_the_job_promptly(n, how, tmp_path):
    seed = BASE + 10 * n
    t = time.monotonic()
    res = run(n, [os.path.join(HERE, "fuzz_program.py"), str(seed), "40", "--fatal", how], timeout=120,
              env={**ENV, "DISTTRAIN_FLIGHT_DIR": str(tmp_path)})
    took = time.monotonic() - t
    m = re.search(r"FUZZ-FATAL rank (\d+)", res.stdout)
    assert m, res.stdout[-4000:]
    assert res.returncode not in (0, -9), f"seed {seed}: the job did not end (rc {res.returncode})\n{res.stdout[-4000:]}"
    assert took < 60, f"seed {seed}: took {took:.0f} s"
    assert "FUZZ-UNREACHABLE" not in res.stdout
    victim = m.group(1)
    named = f"rank {victim} has left the job" if how == "exit" else f"rank {victim}: uncaught exception"
    assert named in res.stdout, f"seed {seed}:\n{res.stdout[-4000:]}"


DISAGREE = re.compile(r"disagree: (\d+) programs, (\d+) deviations \((\d+) harmful\), seed (\d+), (\d+) failures")


@pytest.mark.parametrize("n", [3, 5])
def test_disagreement_fuzz_one_rank_deviates_every_rank_raises_or_all_agree(n, tmp_path):
    """attack9: tests/fuzz_disagree.py - one member of a random collective changes one argument
    (harmful: every member raises CollectiveError) or only its spelling / layout / verbosity
    (harmless: every member's result is the NumPy and MPI answer, bit for bit); never a hang. Odd
    counts only here (3, 5: 240 programs, ~10 s); 2,500+ programs at 2-5 ranks ran by hand."""
    seed = BASE + 1000 + n
    res = run(n, [os.path.join(HERE, "fuzz_disagree.py"), str(seed), "120"], timeout=120,
              env={**ENV, "DISTTRAIN_FLIGHT_DIR": str(tmp_path)})
    summary = DISAGREE.search(res.stdout)
    assert res.returncode == 0 and summary, f"seed {seed} at {n} ranks:\n{res.stdout[-6000:]}"
    programs, deviations, harmful, _, failures = map(int, summary.groups())
    assert failures == 0, res.stdout[-6000:]
    assert programs == 120 and harmful > 20 and deviations - harmful > 20, summary.group(0)
