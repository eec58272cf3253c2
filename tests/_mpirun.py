"""Launch a command under mpiexec with the oversubscription settings this machine needs."""
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# MPICH busy-polls; with more ranks than cores, throttle the progress engine (DESIGN.md sec. 5).
# One BLAS thread per rank: up to 8 ranks share 2 cores here.
OVERSUBSCRIBE_ENV = {"MPIR_CVAR_CH4_PROGRESS_THROTTLE": "1", "MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT": "1",
                     "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _bytecode_env() -> dict:
    """With PYTHONDONTWRITEBYTECODE set (and no PYTHONPYCACHEPREFIX of the user's), every rank of
    every launch compiled from source what it imports that has no .pyc: the tests/mpi files pytest
    rewrites (collecting them cost a rank 1.35 s of CPU, 0.73 s from bytecode) and, in an editable
    install, the library (0.49 -> 0.35 s for `import disttrain.train`). The launches of one test
    session share one temporary bytecode directory instead; the source tree stays untouched."""
    if not os.environ.get("PYTHONDONTWRITEBYTECODE") or os.environ.get("PYTHONPYCACHEPREFIX"):
        return {}
    d = tempfile.mkdtemp(prefix="disttrain-tests-pyc-")
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": d}


#: what every launch adds to the environment for its bytecode (see _bytecode_env)
BYTECODE_ENV = _bytecode_env()


def mpiexec() -> list:
    """The mpiexec next to this Python (the mpich wheel's) unless DISTTRAIN_MPIEXEC names another."""
    exe = os.environ.get("DISTTRAIN_MPIEXEC") or shutil.which("mpiexec", path=os.path.dirname(sys.executable)) \
        or shutil.which("mpiexec")
    if not exe:
        raise RuntimeError("mpiexec not found: pip install mpich, or set DISTTRAIN_MPIEXEC")
    cmd = exe.split()
    out = subprocess.run(cmd + ["--version"], capture_output=True, text=True).stdout
    if "Open MPI" in out or "OpenRTE" in out:
        cmd.append("--oversubscribe")
    return cmd


def run(n: int, args: list, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python args...` on n ranks; kill the whole job if it outlives `timeout` (a hang)."""
    e = dict(os.environ, **OVERSUBSCRIBE_ENV, **BYTECODE_ENV, **(env or {}))
    e.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(mpiexec() + ["-n", str(n), sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=e, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        return subprocess.CompletedProcess(proc.args, -9, out + f"\n*** TIMEOUT after {timeout} s (hang) ***\n")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


#: the program that runs the main job several times in one launch
JOB_BATCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "job_batch.py")


@dataclass
class JobRun:
    """One run of the main job inside a batch: its exit status and its output, per rank."""

    rcs: list
    logs: list

    @property
    def out(self) -> str:
        """Every rank's output, rank 0's first."""
        return "".join(self.logs)


def run_main_jobs(specs: dict, tmp_dir, timeout: float, env: dict | None = None) -> dict:
    """Run each ``name: (ranks, argv)`` of `specs` through ``disttrain.job.main``, one launch per
    rank count (tests/job_batch.py: why, and what stays in real launches), in `specs`' order;
    name -> JobRun. `timeout` is per run. The launch itself must end cleanly: a run that raised or
    hung fails here with every run's output."""
    got = {}
    for n in sorted({n for n, _ in specs.values()}):
        names = [k for k, (m, _) in specs.items() if m == n]
        d = tempfile.mkdtemp(prefix=f"jobs{n}-", dir=tmp_dir)
        with open(os.path.join(d, "runs.json"), "w") as f:
            json.dump([[str(a) for a in specs[k][1]] for k in names], f)
        res = run(n, [JOB_BATCH, d, os.path.join(d, "runs.json")], timeout * len(names), env)
        logs = "".join(f"\n--- {name} ---\n" + open(os.path.join(d, name)).read()[-3000:]
                       for name in sorted(os.listdir(d)) if name.endswith(".log"))
        assert res.returncode == 0 and os.path.exists(os.path.join(d, "result.json")), \
            f"{n} ranks, runs {names}:\n{res.stdout[-4000:]}{logs}"
        rcs = json.load(open(os.path.join(d, "result.json")))["rcs"]
        assert len(rcs) == len(names), rcs
        got.update((k, JobRun(rc, [open(os.path.join(d, f"{i}.rank{r}.log")).read() for r in range(n)]))
                   for i, (k, rc) in enumerate(zip(names, rcs)))
    return got
