"""Issue 14: a rank that leaves, raises before init, or finalizes MPI itself never hangs the job;
the flight recorder names what went wrong. Each test runs a real job under mpiexec."""
import ast
import json
import os
import shutil
import sys
import time

import pytest

from ._mpirun import run

ENV = {"DISTTRAIN_COSTMODEL": "defaults"}


def job(tmp_path, n, body, timeout=60, env=None):
    script = tmp_path / "job.py"
    script.write_text(body)
    t = time.monotonic()
    res = run(n, [str(script)], timeout=timeout, env={**ENV, **(env or {})})
    return res, time.monotonic() - t


# --------------------------------------------------------- 5. a rank that exits early
def test_5_sys_exit_on_one_rank_ends_the_job_naming_it(tmp_path):
    res, took = job(tmp_path, 3, """
import sys, time, numpy as np, disttrain as dt
dt.init()
dt.allreduce(np.ones(4))
if dt.rank() == 1:
    sys.exit(0)                # leaves while the others still communicate
time.sleep(0.3)
dt.allreduce(np.ones(4))       # ranks 0 and 2 wait here for rank 1
print("UNREACHABLE", flush=True)
""")
    assert res.returncode not in (0, -9), res.stdout  # -9: killed by our timeout, i.e. a hang
    assert took < 30, f"took {took:.0f} s"
    assert "rank 1 has left the job" in res.stdout, res.stdout
    assert "UNREACHABLE" not in res.stdout


def test_5_ranks_that_finish_at_different_times_exit_cleanly(tmp_path):
    """The departure protocol must not turn a normal end into an abort: a rank that finishes
    early waits for the others, who still use collectives among themselves."""
    res, _ = job(tmp_path, 3, """
import time, numpy as np, disttrain as dt
dt.init()
y = dt.allreduce(np.ones(4))
g = dt.new_group([0, 2])
if dt.rank() != 1:
    for _ in range(20):
        dt.allreduce(np.ones(8), group=g)   # rank 1 has already left
    time.sleep(0.5)
print("DONE", dt.rank(), flush=True)
""")
    assert res.returncode == 0, res.stdout
    assert res.stdout.count("DONE") == 3


def test_5_exception_before_init_ends_the_job(tmp_path):
    res, took = job(tmp_path, 3, """
import os, disttrain as dt
if os.environ.get("PMI_RANK") == "2":
    raise RuntimeError("bad configuration on rank 2")
dt.init()
import numpy as np
dt.allreduce(np.ones(2))
print("UNREACHABLE", flush=True)
""")
    assert res.returncode not in (0, -9), res.stdout
    assert took < 30
    assert "uncaught exception before dt.init()" in res.stdout and "bad configuration on rank 2" in res.stdout
    assert "UNREACHABLE" not in res.stdout


def test_5_ranks_that_leave_before_init_end_the_job_naming_them(tmp_path):
    """A rank whose program ends before dt.init() - cleanly or with an error status - used to leave
    the others in MPI_Init forever (Hydra ends a job for neither). Its exit hook now takes part in
    the world's first collective as a leaving rank, and the ranks in dt.init() raise."""
    res, took = job(tmp_path, 3, """
import os, sys, time, disttrain as dt
r = os.environ["PMI_RANK"]
if r == "1":
    sys.exit(0)               # e.g. a script that returns early on one host
if r == "2":
    time.sleep(0.3)
    raise SystemExit(4)
dt.init()
print("UNREACHABLE", flush=True)
""", timeout=30)
    assert res.returncode not in (0, -9), res.stdout
    assert took < 20, f"took {took:.0f} s"
    assert "rank(s) [1, 2] of 3 ended their program without calling dt.init()" in res.stdout, res.stdout
    assert "UNREACHABLE" not in res.stdout


def test_5_a_rank_started_through_a_wrapper_that_leaves_before_init_ends_the_job(tmp_path):
    """attack8: ranks started through a wrapper (a shell script, `timeout`, here a Python one that
    imports nothing of disttrain) have the wrapper, not the launcher's proxy, as their parent: the
    exit hook was not registered and the ranks in dt.init() waited forever (killed by the timeout)."""
    (tmp_path / "inner.py").write_text("""
import os, sys, disttrain as dt
if os.environ["PMI_RANK"] == "1":
    sys.exit(0)
dt.init()
print("UNREACHABLE", flush=True)
""")
    wrapper = f"import subprocess, sys; sys.exit(subprocess.call([sys.executable, {str(tmp_path / 'inner.py')!r}], close_fds=False))"
    t = time.monotonic()
    res = run(3, ["-c", wrapper], timeout=30, env=ENV)
    assert res.returncode not in (0, -9), res.stdout  # -9: killed by our timeout, i.e. a hang
    assert time.monotonic() - t < 25
    assert "rank(s) [1] of 3 ended their program without calling dt.init()" in res.stdout, res.stdout
    assert "UNREACHABLE" not in res.stdout


def test_5_a_rank_that_leaves_before_init_under_mpiexec_gforker_ends_the_job(tmp_path, monkeypatch):
    """attack8: MPICH's gforker launcher (in the mpich wheel) is the ranks' parent itself - not a
    name the exit hook knew, so the others waited in dt.init() forever."""
    exe = shutil.which("mpiexec.gforker", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("no mpiexec.gforker next to this python")
    monkeypatch.setenv("DISTTRAIN_MPIEXEC", exe)  # run()'s launcher (its timeout kills the process group)
    res, took = job(tmp_path, 3, """
import os, sys, disttrain as dt
if os.environ["PMI_RANK"] == "1":
    sys.exit(0)
dt.init()
print("UNREACHABLE", flush=True)
""", timeout=30)
    assert res.returncode not in (0, -9) and took < 25, res.stdout  # -9: killed by our timeout, a hang
    assert "rank(s) [1] of 3 ended their program without calling dt.init()" in res.stdout, res.stdout
    assert "UNREACHABLE" not in res.stdout


def test_5_a_child_process_of_a_rank_that_raises_does_not_end_the_job(tmp_path):
    """attack8: a program a rank runs with os.system (its file descriptors inherited, the launcher's
    PMI_FD among them) that imports disttrain and raises took the early excepthook for a rank's: it
    started MPI as that rank and aborted the whole job - every rank killed, no word. It is no rank:
    its exception is its own (exit status 1), and its exit does not join the world's first collective."""
    res, _ = job(tmp_path, 2, """
import os, sys, disttrain as dt
status = os.system(sys.executable + " -c 'import disttrain; raise ValueError(5)'")
assert os.waitstatus_to_exitcode(status) == 1, status   # its own exit status (else this rank aborts the job)
dt.init()
print(f"DONE {dt.rank()}", flush=True)
""", timeout=60)
    assert res.returncode == 0, res.stdout
    assert res.stdout.count("DONE") == 2, res.stdout  # (the ranks' lines may interleave)
    assert "ValueError: 5" in res.stdout and "aborting all ranks" not in res.stdout, res.stdout


def test_5_a_program_where_no_rank_starts_the_runtime_ends_cleanly(tmp_path):
    res, _ = job(tmp_path, 2, """
import disttrain as dt
print("BYE", flush=True)
""", timeout=30)
    assert res.returncode == 0 and res.stdout.count("BYE") == 2, res.stdout
    assert "disttrain]" not in res.stdout, res.stdout


# -------------------------------------------------------------- 6. MPI.Finalize by the user
def test_6_explicit_finalize_stops_every_disttrain_thread(tmp_path):
    res, _ = job(tmp_path, 2, """
import time, numpy as np, disttrain as dt
dt.init()
h = dt.allreduce_async(np.ones(4))
h.wait()
from mpi4py import MPI
MPI.Finalize()
time.sleep(1.5)   # the watchdog polls every 0.1 s: it must be gone
print("FINALIZED", flush=True)
""", env={"DISTTRAIN_STALL_SECONDS": "0.2"})
    assert res.returncode == 0, res.stdout
    assert res.stdout.count("FINALIZED") == 2
    assert "after finalizing" not in res.stdout.lower() and "Traceback" not in res.stdout, res.stdout


# ------------------------------------------------------------------------- flight recorder
def test_flight_record_names_the_rank_that_never_arrived(tmp_path):
    out = tmp_path / "flight"
    res, _ = job(tmp_path, 3, f"""
import time, numpy as np, disttrain as dt
dt.init()
for _ in range(5):
    dt.allreduce(np.ones(16))
if dt.rank() != 2:
    h = dt.allreduce_async(np.ones(16))          # rank 2 never submits this one
    time.sleep(1.0)
dt.dump_flight_record({str(out)!r})
time.sleep(2.0 if dt.rank() == 2 else 0.5)  # an exit without finalize ends the whole job: last one out
import os; os._exit(0)
""")
    files = sorted(os.listdir(out))
    assert files == ["flight-rank0.json", "flight-rank1.json", "flight-rank2.json"], (files, res.stdout)
    rec = json.load(open(out / "flight-rank0.json"))["records"]
    assert [r["seq"] for r in rec if r["group"] == "w:b"] == [1, 2, 3, 4, 5]
    assert rec[-1]["state"] in ("running", "queued", "validating") and rec[-1]["group"] == "w:a"
    from disttrain import flight

    text = flight.diagnose(flight.load(str(out)))
    assert "rank(s) [2] never reached" in text and "#1 of group w:a" in text, text


def test_flight_diagnosis_of_a_mismatch_and_a_straggler():
    from disttrain import flight

    def rec(seq, name, shape, start, site, state="done", group="w:b"):
        return {"name": name, "group": group, "ranks": [0, 1], "seq": seq, "shape": shape, "dtype": "float32",
                "algorithm": "", "site": site, "enqueue": start, "start": start, "end": start + 0.01,
                "state": state, "thread": "MainThread"}

    docs = {r: {"rank": r, "now": 100.0, "wall": 1000.0,
                "records": [rec(s, "allreduce", [4], s + (0.5 if r == 1 else 0.0), "a.py:1") for s in range(1, 11)]}
            for r in (0, 1)}
    docs[1]["records"].append(rec(11, "allreduce", [5], 20, "b.py:7", "running"))
    docs[0]["records"].append(rec(11, "allreduce", [4], 20, "a.py:9", "running"))
    text = flight.diagnose(docs)
    assert "disagree on collective #11" in text and "b.py:7" in text and "a.py:9" in text, text
    assert "rank 1 arrived last" in text, text


def test_4_after_an_abandoned_world_call_set_up_calls_end_the_job_not_hang(tmp_path):
    """Found by the review: a rank whose invalid group= abandoned a world collective went on into
    an untracked set-up check (DataParallel, new_group) that matched its peers' abandoned request,
    and waited forever. Set-up checks are tracked now: refused on a broken group, or the job ends."""
    res, took = job(tmp_path, 3, """
import time, numpy as np, disttrain as dt
from disttrain import nn
dt.init()
try:
    dt.allreduce(np.ones(4), group=("world" if dt.rank() == 1 else None))
except dt.CollectiveError as e:
    print("CAUGHT", dt.rank(), flush=True)
time.sleep(0.5)
try:
    dt.DataParallel(nn.Linear(2, 2))
except dt.CollectiveError as e:
    print("REFUSED", dt.rank(), "unusable" in str(e), flush=True)
print("END", dt.rank(), flush=True)
""")
    assert res.returncode != -9, f"hang:\n{res.stdout}"
    assert took < 30
    assert res.stdout.count("CAUGHT") == 3, res.stdout
    assert res.stdout.count("True") == 3 and res.returncode == 0, res.stdout  # refused alike on every rank


def test_log_is_rank_prefixed_rank_0_by_default_and_every_rank_on_request(tmp_path):
    body = """
import disttrain as dt
from disttrain.log import logger
dt.init()
logger.warning("hello from the log")
logger.error("an error from every rank")
logger.debug("not shown at INFO")
"""
    res, _ = job(tmp_path, 2, body)
    assert res.returncode == 0, res.stdout
    assert res.stdout.count("[disttrain r0] WARNING: hello from the log") == 1 and "r1] WARNING" not in res.stdout
    assert "[disttrain r1] ERROR: an error from every rank" in res.stdout and "not shown" not in res.stdout
    res, _ = job(tmp_path, 2, body, env={"DISTTRAIN_LOG_RANKS": "all", "DISTTRAIN_LOG_LEVEL": "debug"})
    assert "[disttrain r1] WARNING: hello from the log" in res.stdout and "not shown at INFO" in res.stdout


def test_an_environment_that_differs_on_one_rank_is_rank_0s_on_every_rank(tmp_path):
    """DISTTRAIN_VALIDATE=0 on one host only left that rank out of the others' per-collective
    check: the first collective hung (seen: killed at the timeout). Rank 0's environment decides
    for every rank, as for DISTTRAIN_FAKE_NODES and the cost model; a bad value in it is an error
    on every rank. attack9: so do the two switches of init that communicate - the watchdog
    (DISTTRAIN_NO_ABORT_HOOK: its communicator is a collective Dup) and DISTTRAIN_TIMELINE (a
    barrier); set on one host only, the other ranks waited in init / the first collective for good."""
    res, took = job(tmp_path, 3, f"""
import os
if os.environ.get("PMI_RANK") == "1":   # this rank's host sets its own
    os.environ.update(DISTTRAIN_VALIDATE="0", DISTTRAIN_SEGMENT_BYTES="4096", DISTTRAIN_NO_ABORT_HOOK="1",
                      DISTTRAIN_TIMELINE={str(tmp_path / "t.json")!r})
import numpy as np, disttrain as dt
from disttrain import stall
from disttrain.comm import config
dt.init()
got = dt.allreduce(np.full(5, dt.rank() + 1.0), algorithm="ring")
rows = dt.world().comm.gather((got.tolist(), config.current().validate, config.current().segment_bytes,
                               stall._watchdog is not None, dt.timeline.enabled()))
if dt.rank() == 0:   # one line: the ranks' prints would interleave
    print("RESULT", rows, flush=True)
""", timeout=40)
    assert res.returncode == 0, res.stdout[-2000:]
    rows = ast.literal_eval(next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))[7:])
    assert rows[0][:2] == ([6.0] * 5, True) and rows[0][2] != 4096 and rows[0][3:] == (True, False), rows
    assert rows == [rows[0]] * 3, rows  # every rank: the sum, and rank 0's settings
    res, _ = job(tmp_path, 3, """
import os
if os.environ.get("PMI_RANK") == "0":
    os.environ["DISTTRAIN_SEGMENT_BYTES"] = "x"
import disttrain as dt
dt.init()
print("UNREACHABLE", flush=True)
""", timeout=40)
    assert res.returncode != 0 and "UNREACHABLE" not in res.stdout
    assert "DISTTRAIN_SEGMENT_BYTES='x' is not an integer" in res.stdout, res.stdout[-2000:]


def test_a_threads_collective_during_init_waits_for_init(tmp_path):
    """attack5: the world was visible to every thread from the middle of init on, so a user
    thread's collective met init's own collectives on the world's communicators - MPI "Message
    truncated" and an abort. Other threads now see the world only once init has finished."""
    res, _ = job(tmp_path, 3, """
import threading, time, numpy as np, disttrain as dt
res = {}
def worker():
    while dt.groups.current() is None:   # the moment init publishes the world internally
        time.sleep(0.0001)
    res["t"] = dt.allreduce(np.ones(2) * 2)
t = threading.Thread(target=worker); t.start()
dt.init(); t.join()
x = dt.allreduce(np.ones(4))
assert (res["t"] == 2 * dt.size()).all() and (x == dt.size()).all(), (res, x)
print("DONE", flush=True)
""")
    assert res.returncode == 0, res.stdout
    assert res.stdout.count("DONE") == 3, res.stdout


def test_a_signal_the_program_handles_itself_does_not_end_the_job(tmp_path):
    """review6: the stall thread read every signal from Python's wakeup fd and aborted the job for
    any of them - a user's own SIGUSR1 handler (Slurm's --signal=USR1 to checkpoint before the time
    limit) or SIGALRM timeout ended every rank. Only the signals disttrain handles (SIGTERM, SIGINT,
    SIGHUP left at their defaults) end the job."""
    res, _ = job(tmp_path, 2, """
import os, signal, time, numpy as np, disttrain as dt
dt.init()
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
os.kill(os.getpid(), signal.SIGUSR1)
time.sleep(0.5)                       # the stall thread polls every 0.1 s
y = dt.allreduce(np.ones(3))
assert got == [1] and (y == dt.size()).all(), (got, y)
print("DONE", flush=True)
""")
    assert res.returncode == 0, res.stdout
    assert res.stdout.count("DONE") == 2, res.stdout
