"""The main job under the parameter servers (--sync async / ssp:S): it trains the digits MLP to
>= 95% test accuracy with its metrics; refused configurations end every rank with a message; a
worker or server that dies (SIGKILL, an exception, an early exit) at a named point ends the job
with a message naming it - never a hang."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from disttrain.job.config import ConfigError, parse_config

from ._mpirun import BYTECODE_ENV, OVERSUBSCRIBE_ENV, mpiexec, run

ENV = {"DISTTRAIN_COSTMODEL": "defaults"}


@pytest.mark.parametrize("mode", ["async", "ssp:2"])
def test_main_job_trains_digits_to_95_percent(tmp_path, mode):
    m = tmp_path / "m.jsonl"
    res = run(4, ["-m", "disttrain.train", "--sync", mode, "--steps", "150", "--log-every", "50", "--metrics", str(m),
                  "--checkpoint-dir", str(tmp_path / "ck")], timeout=240, env=ENV)
    assert res.returncode == 0, res.stdout[-3000:]
    recs = [json.loads(x) for x in m.read_text().splitlines()]
    final = recs[-1]
    assert final["final"] and final["test_accuracy"] >= 0.95, final
    logged = [r for r in recs if "loss" in r]
    # async: rank 0 logs its own steps (the budget of 150 x 4 pushes is shared by pace), so at
    # each 50 of them and at its last
    assert len(logged) == 3 if mode == "ssp:2" else [r["step"] for r in logged[:-1]] == list(
        range(50, 50 * len(logged), 50)), [r["step"] for r in logged]
    for r in logged:
        assert r["wait_s"] >= 0 and r["staleness_max"] >= r["staleness_mean"] >= 0
        # a push and the answers of this rank's server: 2 (P-1)/P of the float32 model per step
        # (answers may lag their push by S steps across an interval's edge; async: rank 0's server
        # answers every worker's pushes, and they do not step at rank 0's pace)
        assert r["bytes_sent_per_step"] == pytest.approx(2 * 3 / 4 * 85002 * 4, rel=0.05 if mode == "ssp:2" else 0.5)
        if mode == "ssp:2":
            assert r["staleness_max"] <= 2
    if mode == "async":
        assert sum(final["steps_per_worker"]) == final["pushes_applied"] == 600, final
        # the servers' count when rank 0 logged its last step (others may still push): <= 600 / 4
        assert 0 < logged[0]["global_step"] <= logged[-1]["global_step"] <= 150, logged
    assert (tmp_path / "ck").is_dir()  # the final checkpoint, of the servers' values


def test_async_lets_fast_workers_do_the_stragglers_share(tmp_path):
    """--sync async with a persistent straggler (rank 3 sleeps 30 ms after every backward, several
    times its compute): --steps 150 is a budget of 600 pushes that the fast workers mostly spend;
    the job still trains the digits MLP to >= 95% and nothing in the metrics path waits for rank 3
    (rank 0 logs at its own pace)."""
    m = tmp_path / "m.jsonl"
    env = {"DISTTRAIN_FAULT_INJECT": "train-step", "DISTTRAIN_FAULT_ACTION": "sleep:0.03", "DISTTRAIN_FAULT_RANK": "3",
           **ENV}
    res = run(4, ["-m", "disttrain.train", "--sync", "async", "--steps", "150", "--log-every", "20", "--eval-every",
                  "40", "--metrics", str(m)], timeout=240, env=env)
    assert res.returncode == 0, res.stdout[-3000:]
    recs = [json.loads(x) for x in m.read_text().splitlines()]
    final = recs[-1]
    assert final["final"] and final["test_accuracy"] >= 0.95, final
    steps = final["steps_per_worker"]
    assert sum(steps) == 600 and steps[3] < min(steps[:3]), steps
    assert "steps per worker" in res.stdout and "this worker's step" in res.stdout
    logged = [r for r in recs if "loss" in r]
    assert logged[-1]["step"] == steps[0] > 150  # rank 0 did more than its 150 steps
    assert [r["step"] for r in recs if "test_accuracy" in r and not r.get("final")] == list(range(40, steps[0] + 1, 40))


@pytest.mark.parametrize("flags,message", [
    (["--sync", "ssp:2", "--checkpoint-dir", "CK", "--checkpoint-every", "10"], "--checkpoint-every is refused"),
    (["--sync", "async", "--checkpoint-dir", "CK", "--resume"], "--resume is refused"),
    (["--sync", "async", "--optimizer", "lamb"], "optimizer lamb needs whole-tensor norms"),
    (["--sync", "ssp:-1"], "needs the staleness bound S, an integer >= 0"),
    (["--sync", "async:2"], "takes no parameter"),
    (["--sync", "async", "--shard", "optimizer"], "use --shard none"),
    (["--sync", "ssp:0", "--compression", "fp16"], "use --compression none"),
    (["--sync", "ssp:0", "--pp", "2"], "use --pp 1 --tp 1"),
    (["--sync", "async", "--model", "dlrm", "--dataset", "clicks"], "model dlrm holds sharded embedding tables"),
])
def test_refused_configurations(tmp_path, flags, message):
    """Decided from the flags alone (parse_config), so every rank reaches the same verdict."""
    flags = [str(tmp_path / "ck") if f == "CK" else f for f in flags]
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(flags)


def test_a_refused_configuration_ends_every_rank_with_one_message(tmp_path):
    t = time.monotonic()
    res = run(3, ["-m", "disttrain.train", "--sync", "ssp:1", "--stop-after-steps", "5"], timeout=60, env=ENV)
    assert res.returncode == 2 and "--stop-after-steps is refused" in res.stdout, res.stdout[-2000:]
    assert res.stdout.count("configuration error") == 1 and time.monotonic() - t < 50


@pytest.mark.parametrize("mine,theirs", [("local:2", "sync"), ("ssp:1", "async")])
def test_a_configuration_that_differs_on_one_rank_ends_every_rank_with_one_message(mine, theirs):
    """Valid on every rank but different on one (a --config file that differs on one host; here
    MPMD flags): rank 0 would split its data-parallel group, the others not - a hang in the first
    collective (seen: DataParallel's set-up check, until the 90 s timeout) before the ranks agreed
    on the configuration, not only on its errors."""
    job = [sys.executable, "-m", "disttrain.train", "--steps", "4", "--sync"]
    env = dict(os.environ, **OVERSUBSCRIBE_ENV, **BYTECODE_ENV, **ENV)
    t = time.monotonic()
    proc = subprocess.Popen(mpiexec() + ["-n", "1", *job, mine, ":", "-n", "2", *job, theirs], text=True, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # the hang: end the whole job, leave nothing running
        os.killpg(proc.pid, 9)
        out = proc.communicate()[0] + "\n*** TIMEOUT (hang) ***"
    assert proc.returncode == 2 and "configuration differs between ranks" in out, out[-2000:]
    assert f"sync: rank 0 has {mine!r}, rank 1 has {theirs!r}" in out and out.count("configuration error") == 1
    assert time.monotonic() - t < 50


def _pids(out: str) -> dict:
    line = next(x for x in out.splitlines() if "rank:pid" in x)
    return {int(r): int(p) for r, p in re.findall(r"(\d+):(\d+)", line.split("rank:pid")[1])}


# (point, action, rank, mode): a worker before its push, the server while it handles a message;
# killed (SIGKILL), raising, or leaving the job early (sys.exit in the worker / the server thread)
@pytest.mark.parametrize("point,action,rank,mode", [
    ("ps-push", "kill", 1, "ssp:1"), ("ps-serve", "kill", 2, "async"), ("ps-push", "raise", 1, "async"),
    ("ps-serve", "raise", 2, "ssp:1"), ("ps-push", "exit", 1, "ssp:1"), ("ps-serve", "exit", 0, "async")])
def test_a_dead_worker_or_server_ends_the_job_naming_it(tmp_path, point, action, rank, mode):
    fault = {"DISTTRAIN_FAULT_INJECT": point, "DISTTRAIN_FAULT_AT": "40", "DISTTRAIN_FAULT_RANK": str(rank),
             "DISTTRAIN_FAULT_ACTION": action, "DISTTRAIN_FLIGHT_DIR": str(tmp_path), **ENV}
    t = time.monotonic()
    res = run(3, ["-m", "disttrain.train", "--sync", mode, "--steps", "400", "--log-every", "1000"], timeout=90,
              env=fault)
    out = res.stdout
    assert res.returncode not in (0, -9) and time.monotonic() - t < 80, out[-3000:]
    assert "done: test accuracy" not in out, out[-3000:]
    if action == "kill":  # it cannot speak, and the launcher kills the others at once (naming one pid
        # of the job, not always the dead one's): the job ends promptly; the start-up line maps pids to ranks
        pids = _pids(out)
        assert "BAD TERMINATION" in out and "signal 9" in out, out[-3000:]
        assert any(f"PID {q} " in out for q in pids.values()), out[-3000:]
    elif action == "raise":
        thread = "thread disttrain-ps-server" if point == "ps-serve" else "the main thread"
        assert f"rank {rank}: uncaught exception in {thread}" in out, out[-3000:]
        assert "injected fault at " + point in out, out[-3000:]
    elif point == "ps-push":  # it left: a worker waiting for its clock or its shard names it
        assert f"rank {rank} has left the job" in out, out[-3000:]
    else:
        assert f"parameter server on rank {rank}: its thread exited" in out, out[-3000:]


UNEVEN = """
import numpy as np, disttrain as dt
from disttrain import optim
from disttrain.parallel.sync.ps import ParameterServer
from disttrain_zoo.mlp import MLP
dt.init()
model = MLP([3, 4, 2], dtype=np.float64)
opt = optim.SGD(model.parameters(), lr=0.1)
ps = ParameterServer(model.parameters(), opt, optim.Schedule(opt), {staleness})
for t in range(5 if dt.rank() == 1 else 8):  # rank 1 stops early: a bug that must not hang the others
    ps.step(t)
ps.finish(opt)
"""


@pytest.mark.parametrize("staleness", ["1", "None"])
def test_workers_that_finish_after_different_numbers_of_steps_end_the_job(tmp_path, staleness):
    s = tmp_path / "uneven.py"
    s.write_text(UNEVEN.format(staleness=staleness))
    res = run(3, [str(s)], timeout=60, env={"DISTTRAIN_FLIGHT_DIR": str(tmp_path), **ENV})
    assert res.returncode not in (0, -9), res.stdout[-3000:]
    assert "the workers finished after different numbers of steps" in res.stdout, res.stdout[-3000:]


BUDGET = """
import numpy as np, disttrain as dt
from disttrain import optim
from disttrain.parallel.sync.ps import ParameterServer
from disttrain_zoo.mlp import MLP
dt.init()
model = MLP([3, 4, 2], dtype=np.float64)
opt = optim.SGD(model.parameters(), lr=0.1)
ps = ParameterServer(model.parameters(), opt, optim.Schedule(opt), None, budget=30)
while ps.more and not (dt.rank() == 1 and ps.clock == 3):  # rank 1 leaves a granted step undone: a bug
    ps.step()
ps.finish(opt)
"""


def test_a_worker_that_leaves_a_granted_step_undone_ends_the_job(tmp_path):
    """Under an update budget the servers check at the end that the pushes add up to it: a worker
    that stops while it still holds a grant ends the job with a message, not a short run."""
    s = tmp_path / "budget.py"
    s.write_text(BUDGET)
    res = run(3, [str(s)], timeout=60, env={"DISTTRAIN_FLIGHT_DIR": str(tmp_path), **ENV})
    assert res.returncode not in (0, -9), res.stdout[-3000:]
    assert "the workers pushed 29 steps in total, not the budget of 30" in res.stdout, res.stdout[-3000:]


def test_a_stuck_worker_is_named_by_the_stall_inspector(tmp_path):
    """A rank that never pushes again (stuck in its step): the workers waiting on its clock are
    tracked like a collective, so the stall report names it and the stall shutdown ends the job."""
    env = {"DISTTRAIN_FAULT_INJECT": "train-step", "DISTTRAIN_FAULT_ACTION": "sleep:100", "DISTTRAIN_FAULT_RANK": "1",
           "DISTTRAIN_STALL_SECONDS": "1", "DISTTRAIN_STALL_SHUTDOWN_SECONDS": "3",  # as tests/test_faults.STALL
           "DISTTRAIN_FLIGHT_DIR": str(tmp_path), **ENV}
    res = run(3, ["-m", "disttrain.train", "--sync", "ssp:1", "--steps", "50"], timeout=60, env=env)
    out = res.stdout
    assert res.returncode not in (0, -9), out[-3000:]
    assert "has been waiting in ps pull" in out and "ranks missing from ps pull: [1]" in out, out[-3000:]
    assert "stall shutdown after 3 s" in out, out[-3000:]


@pytest.mark.parametrize("mode", ["async", "ssp:1"])
def test_a_nan_on_one_rank_stops_the_job_and_that_rank_says_why(tmp_path, mode):
    """Under the parameter servers each rank judges its own gradients (no rank knows another's at
    that step): with --on-nonfinite stop the rank that saw the NaN stops with the reason and its
    rank, and the others end through the departure protocol - promptly, never a hang."""
    prog = os.path.join(os.path.dirname(__file__), "nan_on_one_rank_job.py")
    t = time.monotonic()
    res = run(3, [prog, "--sync", mode, "--steps", "8", "--on-nonfinite", "stop"], timeout=120,
              env={"DISTTRAIN_FLIGHT_DIR": str(tmp_path), **ENV})
    assert res.returncode != 0, res.stdout[-3000:]
    assert re.search(rf"step 3: non-finite .*\(rank 1; --sync {mode} judges each rank's gradients", res.stdout), \
        res.stdout[-3000:]
    assert time.monotonic() - t < 100
