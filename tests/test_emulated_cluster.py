"""launchers/emulated_cluster.sh: separate hosts, shaped links, and no leftovers - even on failure.

Needs root and iproute2 (network namespaces, veth, tc); without them these tests are skipped with
that reason (the rest of the suite does not depend on them)."""
import os
import re
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


def root_veths():
    """The launcher's veths (dte<id>-<i> / dtp<id>-<i>) in this, the root, namespace."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = [ln.split(": ")[1].split("@")[0] for ln in out.splitlines() if ": " in ln]
    return [n for n in names if re.fullmatch(r"dt[ep]\d+-\d+", n)]


def leftovers():
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    etc = os.listdir("/etc/netns") if os.path.isdir("/etc/netns") else []
    return ([ln for ln in ns.splitlines() if ln.startswith("dtemu")] + [e for e in etc if e.startswith("dtemu")]
            + root_veths())


def root_addresses():
    return subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout


def launch(tmp_path, *args, extra=(), timeout=120, env=None):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **(env or {}))
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
    """--delay needs the kernel's netem qdisc; kernels without it get a clear refusal, no residue -
    not even a temporary file (the refusal comes in the middle of set-up)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    res = launch(tmp_path, "--hosts", "2", "--delay", "1ms", extra=["4096"], env={"TMPDIR": str(tmp)})
    assert res.returncode == 0 or "netem" in res.stderr, res.stderr
    assert leftovers() == []
    assert os.listdir(tmp) == []


def _dead_pid():
    """A process id no process has now: a dead run's id."""
    pid = 4_000_000
    while os.path.exists(f"/proc/{pid}"):
        pid -= 1
    return pid


def test_sigkill_during_set_up_leaves_nothing_in_the_root_namespace_and_cleanup_removes_the_rest(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    probe = tmp_path / "probe.py"
    probe.write_text("print('never runs')\n")
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=ROOT, TMPDIR=str(tmp))
    p = subprocess.Popen([SCRIPT, "--hosts", "40", "--", str(probe)], env=env, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ns = f"dtemu{p.pid}-h2"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and ns not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                                    text=True).stdout:
        assert p.poll() is None, "set-up ended before it could be killed"
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGKILL)  # the launcher and whatever `ip` it is running: no trap runs
    p.wait(timeout=30)
    try:
        assert root_veths() == []  # veths are born inside the namespaces, never in the root one
        assert any(x.startswith(f"dtemu{p.pid}-") for x in leftovers())  # SIGKILL: left for --cleanup
        assert os.listdir(tmp) == []  # no temporary file to strand
    finally:
        res = subprocess.run([SCRIPT, "--cleanup"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and f"run {p.pid}" in res.stdout, res.stdout + res.stderr
    assert leftovers() == []


def test_cleanup_finds_every_kind_of_leftover_of_a_dead_run():
    """What a SIGKILLed run (of this or an older version of the script) can leave: a namespace, an
    /etc/netns entry whose namespace is already gone, a veth pair in the root namespace."""
    dead = _dead_pid()
    subprocess.run(["ip", "netns", "add", f"dtemu{dead}-h0"], check=True)
    os.makedirs(f"/etc/netns/dtemu{dead}-h1", exist_ok=True)
    subprocess.run(["ip", "link", "add", f"dte{dead}-0", "type", "veth", "peer", "name", f"dtp{dead}-0"], check=True)
    try:
        assert {f"dtemu{dead}-h0", f"dtemu{dead}-h1", f"dte{dead}-0", f"dtp{dead}-0"} <= set(leftovers())
    finally:
        res = subprocess.run([SCRIPT, "--cleanup"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert leftovers() == []


HIER_PROBE = """
import numpy as np
import disttrain as dt
from mpi4py import MPI
from disttrain.comm import costmodel, topology
dt.init()
comm = dt.world().comm
t = topology.of(comm)
c = costmodel.params_of(comm)
picks = {nb: costmodel.choose("allreduce", comm, nb, np.dtype(np.float32)) for nb in (1 << 20, 16 << 20)}
ok = True
for n in (0, 5, 100_003, 9 << 20):  # 36 MiB: the pipelined path (16 MiB chunks)
    x = np.random.default_rng(dt.rank() + n).integers(-9, 10, n).astype(np.float32)
    want = np.empty_like(x)
    comm.Allreduce(x, want, op=MPI.SUM)
    ok &= bool(np.array_equal(dt.allreduce(x, algorithm="hier"), want))
    ok &= bool(np.array_equal(dt.allreduce(x), want))
ok = comm.allreduce(int(ok), op=MPI.MIN)
if dt.rank() == 0:
    print("TOPO", t.layout, t.node_of, c.hosts, c.source, picks[1 << 20], picks[16 << 20], "OK" if ok else "BAD",
          flush=True)
costmodel.NATIVE_SIZES, costmodel.LARGE = (8, 1 << 16, 1 << 20), 4 << 20  # lean
m = dt.calibrate()  # across hosts: skips what cannot run there (shm), measures both levels
if dt.rank() == 0:
    print("CAL", m.hosts, m.layout, m.alpha_inter > 0, m.beta_inter > 0, "shm" not in m.overhead, flush=True)
"""


def on_hosts(tmp_path, program: str, hosts: int, per_host: int):
    """Run `program` on `hosts` emulated hosts of `per_host` ranks (10 Gbit/s links, built-in cost
    model); the finished process, asserted successful."""
    probe = tmp_path / "probe_on_hosts.py"
    probe.write_text(program)
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=ROOT, OMP_NUM_THREADS="1",
               DISTTRAIN_COSTMODEL="defaults")
    res = subprocess.run([SCRIPT, "--hosts", str(hosts), "--ranks-per-host", str(per_host), "--rate", "10gbit",
                          "--", str(probe)], capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_hier_on_separate_hosts_is_exact_and_auto_picks_it_uncalibrated(tmp_path):
    """Real nodes (separate hosts, a shaped link): the topology sees 2 x 2, the two-level
    allreduce equals the library's, "auto" picks it with the built-in defaults (no calibration),
    and calibrating there measures both levels (and skips shm, which cannot run across hosts)."""
    res = on_hosts(tmp_path, HIER_PROBE, 2, 2)
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("TOPO")).split(maxsplit=1)[1]
    assert line == "2x2 (0, 0, 1, 1) 2 defaults hier hier OK", line
    assert "CAL 2 2x2 True True True" in res.stdout, res.stdout


COLL_PROBE = """
import numpy as np
import disttrain as dt
from mpi4py import MPI
from disttrain.comm import costmodel, topology
dt.init()
comm = dt.world().comm
p, r = dt.size(), dt.rank()
rng = np.random.default_rng(r)
ok = []
x = rng.integers(-9, 10, (4 * p + 3, 5)).astype(np.int64)  # rows not divisible by p
ok.append(np.array_equal(dt.reduce_scatter(x, algorithm="hier"), np.array_split(comm.allreduce(x), p)[r]))
y = rng.standard_normal((r + 1, 3)).astype(np.float32)  # uneven rows
ok.append(np.array_equal(dt.allgather(y, algorithm="hier"), np.concatenate(comm.allgather(y))))
splits = rng.integers(0, 50, p)
z = rng.integers(0, 99, (int(splits.sum()), 2)).astype(np.int32)
blocks = comm.alltoall(np.split(z, np.cumsum(splits)[:-1]))  # the library's (pickled) alltoall
got, rs = dt.alltoall(z, splits, algorithm="hier")
ok.append(np.array_equal(got, np.concatenate(blocks)) and rs == [len(b) for b in blocks])
u8 = np.dtype(np.uint8)
picks = [costmodel.choose(f, comm, 16 << 20, u8) for f in ("allgather", "reduce_scatter")]
ok = comm.allreduce(int(all(ok)), op=MPI.MIN)
if r == 0:
    print("COLL", topology.of(comm).layout, *picks, "OK" if ok else "BAD", flush=True)
"""


def test_hier_allgather_reduce_scatter_alltoallv_on_separate_hosts(tmp_path):
    """Real nodes (3 hosts x 2 ranks, shaped links): the two-level reduce-scatter, allgather and
    alltoallv equal the library's collectives, and "auto" picks the first two uncalibrated."""
    res = on_hosts(tmp_path, COLL_PROBE, 3, 2)
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("COLL")).split(maxsplit=1)[1]
    assert line == "3x2 hier hier OK", line
