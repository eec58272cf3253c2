"""launchers/emulated_cluster.sh: separate hosts, shaped links, and no leftovers - even on failure.

Needs root and iproute2 (network namespaces, veth, tc); without them these tests are skipped with
that reason (the rest of the suite does not depend on them)."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launchers", "emulated_cluster.sh")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("tc") and shutil.which("unshare")),
    reason="needs root, iproute2 and util-linux (network namespaces)")

PROBE = """
import socket, sys, time
import numpy as np
import disttrain as dt
dt.init()
names = dt.world().comm.allgather(socket.gethostname())
x = np.ones(int(sys.argv[1]) // 4, np.float32)
dt.allreduce(x, algorithm="ring")
dt.world().comm.Barrier()
t = time.perf_counter()
y = dt.allreduce(x, algorithm="ring")
took = time.perf_counter() - t
assert y[0] == dt.size()
if dt.rank() == 0:
    print("HOSTS", ",".join(names), "SECONDS", took, flush=True)
if len(sys.argv) > 2 and dt.rank() == int(sys.argv[2]):
    raise SystemExit(f"rank {dt.rank()} fails on purpose")
"""


def leftovers():
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    etc = os.listdir("/etc/netns") if os.path.isdir("/etc/netns") else []
    return [ln for ln in ns.splitlines() if ln.startswith("dtemu")] + [e for e in etc if e.startswith("dtemu")]


def root_addresses():
    return subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout


def launch(tmp_path, *args, extra=(), timeout=120):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([SCRIPT, *args, "--", str(probe), *extra], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_ranks_run_on_separate_hosts_over_a_shaped_link_and_everything_is_removed(tmp_path):
    before = root_addresses()
    nbytes = 2_000_000
    res = launch(tmp_path, "--hosts", "2", "--rate", "100mbit", extra=[str(nbytes)])
    assert res.returncode == 0, res.stdout + res.stderr
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("HOSTS"))
    hosts, seconds = line.split()[1], float(line.split()[3])
    assert hosts == "h0,h1"
    # the ring sends n bytes each way at P = 2: at 100 Mbit/s that cannot take less than n / 12.5 MB/s
    assert seconds >= 0.8 * nbytes / 12.5e6, f"{seconds:.3f} s: the data did not cross the shaped link"
    assert leftovers() == []
    assert root_addresses() == before  # no address was added outside the namespaces it created


def test_several_ranks_per_host_and_three_hosts(tmp_path):
    res = launch(tmp_path, "--hosts", "3", "--ranks-per-host", "2", "--rate", "10gbit", extra=["4096"])
    assert res.returncode == 0, res.stdout + res.stderr
    hosts = next(ln for ln in res.stdout.splitlines() if ln.startswith("HOSTS")).split()[1].split(",")
    assert hosts == ["h0", "h0", "h1", "h1", "h2", "h2"]
    assert leftovers() == []


def test_a_failing_job_is_reported_and_cleaned_up(tmp_path):
    res = launch(tmp_path, "--hosts", "2", "--rate", "1gbit", extra=["4096", "1"])
    assert res.returncode != 0
    assert "fails on purpose" in res.stdout + res.stderr
    assert leftovers() == []


def test_sigterm_to_the_launcher_tears_everything_down(tmp_path):
    probe = tmp_path / "sleep.py"
    probe.write_text("import time, disttrain as dt\ndt.init()\nprint('UP', flush=True)\ntime.sleep(60)\n")
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=ROOT, DISTTRAIN_NO_ABORT_HOOK="1")
    p = subprocess.Popen([SCRIPT, "--hosts", "2", "--", str(probe)], stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    # "UP" of both ranks may arrive in one chunk ("UPUP"): Hydra forwards output, not lines
    while time.monotonic() < deadline and "UP" not in p.stdout.readline():
        pass
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) != 0
    assert leftovers() == []


def test_bad_options_are_refused_before_anything_is_created(tmp_path):
    for args, msg in [(["--hosts", "0"], "--hosts must be 1..200"), (["--bogus"], "unknown option --bogus"),
                      (["--ranks-per-host", "-1"], "--ranks-per-host must be")]:
        res = launch(tmp_path, *args, extra=["4096"], timeout=60)
        assert res.returncode == 2 and msg in res.stderr, (args, res.stderr)
    assert leftovers() == []


def test_delay_works_or_says_why_not(tmp_path):
    """--delay needs the kernel's netem qdisc; kernels without it get a clear refusal, no residue."""
    res = launch(tmp_path, "--hosts", "2", "--delay", "1ms", extra=["4096"])
    assert res.returncode == 0 or "netem" in res.stderr, res.stderr
    assert leftovers() == []
