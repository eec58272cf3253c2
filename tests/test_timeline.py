"""The timeline streams: bounded memory per rank, one complete merged trace at stop(), and per-rank
files that survive a killed process and still merge."""
import json
import os
import signal
import subprocess
import sys

from ._mpirun import run

N_MAIN, N_COMM = 3000, 700

BOUNDED = f"""
import json, os, sys, threading
import disttrain as dt
from disttrain import timeline as T

T.BUFFER_EVENTS = 50
path = sys.argv[1]
T.start(path)
r = dt.rank()
assert os.path.exists(T.rank_file(path, r))  # streaming from the start
peak = 0

def comm_thread():
    for i in range({N_COMM}):
        with T.span("comm", "comm-async", i=i):
            pass

th = threading.Thread(target=comm_thread, name="disttrain-comm")
th.start()
for i in range({N_MAIN}):
    with T.span("work", i=i):
        pass
    T.instant("mark", i=i)
    peak = max(peak, len(T._buf))
th.join()
out = T.stop()
assert not os.path.exists(T.rank_file(path, r))  # merged, then removed
with open(f"{{path}}.peak{{r}}", "w") as f:  # (stdout lines of ranks interleave)
    f.write(str(peak))
if r == 0:
    assert out == path
"""


def test_streamed_timeline_has_bounded_memory_and_a_complete_merged_trace(tmp_path):
    script = tmp_path / "bounded.py"
    script.write_text(BOUNDED)
    trace = tmp_path / "sub" / "t.json"
    res = run(3, [str(script), str(trace)], timeout=90)
    assert res.returncode == 0, res.stdout
    peaks = [int((tmp_path / "sub" / f"t.json.peak{r}").read_text()) for r in range(3)]
    assert max(peaks) <= 50 + 1, peaks  # the cap (+1: the other thread's append)
    ev = json.loads(trace.read_text())["traceEvents"]
    for r in range(3):
        mine = [e for e in ev if e["pid"] == r]
        for name, n in (("work", N_MAIN), ("mark", N_MAIN), ("comm", N_COMM)):
            assert sorted(e["args"]["i"] for e in mine if e["name"] == name) == list(range(n)), (r, name)
        threads = {e["args"]["name"] for e in mine if e["name"] == "thread_name"}
        assert threads == {"MainThread", "disttrain-comm"}
        assert any(e["name"] == "process_name" for e in mine)
    assert sorted(os.listdir(trace.parent)) == ["t.json"] + [f"t.json.peak{r}" for r in range(3)]


CRASH = """
import os, sys, time
import disttrain as dt
from disttrain import timeline as T

T.BUFFER_EVENTS = 100
T.start(sys.argv[1])
for i in range(1000):
    with T.span("work", i=i):
        pass
os.kill(os.getpid(), 9)  # no stop(), no atexit
"""


def test_per_rank_file_of_a_killed_process_still_merges(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    trace = tmp_path / "t.json"
    res = subprocess.run([sys.executable, str(script), str(trace)], capture_output=True, text=True, timeout=60)
    assert res.returncode == -signal.SIGKILL, res.stderr
    own = tmp_path / "t.rank0.json"
    json.loads(own.read_text().rstrip().rstrip(",") + "]")  # the stream file is a trace on its own
    with open(own, "a") as f:
        f.write('{"name": "work", "ph": "X", "ts": 1')  # a write cut short by the kill
    out = tmp_path / "merged.json"
    cli = subprocess.run([sys.executable, "-m", "disttrain.timeline", "merge", str(out), str(own)],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    ev = json.loads(out.read_text())["traceEvents"]
    work = [e["args"]["i"] for e in ev if e["name"] == "work" and "args" in e]
    assert work == list(range(len(work))) and len(work) >= 1000 - 100  # all but the unflushed buffer
    again = tmp_path / "again.json"  # a merged (whole) trace merges too
    subprocess.run([sys.executable, "-m", "disttrain.timeline", "merge", str(again), str(out)], check=True,
                   capture_output=True, timeout=60)
    assert json.loads(again.read_text())["traceEvents"] == ev
