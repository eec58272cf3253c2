"""Run the main job (``disttrain.job.main``) several times in ONE launch:

    mpiexec -n N python tests/job_batch.py OUTDIR RUNS_JSON

RUNS_JSON is a JSON list of argument lists, each what ``python -m disttrain.train`` would take.
Run k's stdout and stderr go, per rank, to OUTDIR/k.rank{r}.log (a test sees who said what: e.g.
one message from rank 0 and nothing from the others - stricter than the launcher's merged
output); OUTDIR/result.json (rank 0) holds every run's exit status on every rank.

Why (tests/_mpirun.run_main_jobs): a launch costs ~1-2 s of start-up per job here (interpreter,
NumPy, Numba, the library, MPI_Init, dt.init) and trains a few steps; tests whose property is the
job's numbers or its refusal of a flag set, not the process around it, share that cost. What a
fresh process alone shows stays in real launches (``python -m disttrain.train``): the exit
status of the process, resuming from a checkpoint alone, fault injection, signals. The comm
settings are restored between runs (as tests/mpi/conftest.py does between tests); a run that
leaks state into the next one makes that run differ from its oracle - a failure, never a pass.
"""
import json
import os
import sys

from mpi4py import MPI

import disttrain as dt
from disttrain.comm import config
from disttrain.job import main


def _redirect(path: str | None, saved: tuple) -> None:
    """Point fds 1 and 2 at `path` (None: back to the launcher's)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if path is None:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


if __name__ == "__main__":
    outdir, runs = sys.argv[1], json.load(open(sys.argv[2]))
    dt.init()
    rank, saved = MPI.COMM_WORLD.Get_rank(), (os.dup(1), os.dup(2))
    initial, rcs = config.settings, []
    for k, argv in enumerate(runs):
        _redirect(os.path.join(outdir, f"{k}.rank{rank}.log"), saved)
        code = main(argv)
        _redirect(None, saved)
        config.restore(initial)
        rcs.append(MPI.COMM_WORLD.allgather(code))
    if rank == 0:
        with open(os.path.join(outdir, "result.json"), "w") as f:
            json.dump({"rcs": rcs}, f)
