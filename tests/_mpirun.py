"""Launch a command under mpiexec with the oversubscription settings this machine needs."""
import atexit
import os
import shutil
import subprocess
import sys
import tempfile

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
