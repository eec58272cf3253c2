"""The schedule fuzzer (tests/fuzz_program.py) in the suite: 1,000 random programs over 2-5 ranks,
and jobs in which one rank leaves at a random point. Seeds are fixed (reproducible); set
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
    res = run(n, [os.path.join(HERE, "fuzz_program.py"), str(seed), "250"], timeout=150,
              env={**ENV, "DISTTRAIN_FLIGHT_DIR": str(tmp_path)})
    summary = SUMMARY.search(res.stdout)
    assert res.returncode == 0 and summary, f"seed {seed} at {n} ranks:\n{res.stdout[-6000:]}"
    programs, calls, faults, _, failures = map(int, summary.groups())
    assert failures == 0, res.stdout[-6000:]
    assert programs == 250 and calls > 1000 and faults > 50, summary.group(0)


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
