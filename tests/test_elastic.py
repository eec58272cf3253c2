"""launchers/elastic.sh for real: ranks and hosts die (SIGKILL), the job continues on what is left
from its newest checkpoint, and the loss curve is the uninterrupted run's (one process on the same
global batch, float64). Lean: a 32-wide MLP, batch 16, 40 steps, checkpoints every 5 steps.

Hosts are emulated on this machine (no root needed): the hostfile names hosts hA, hB, hC and Hydra
starts each host's proxy through tests/fake_ssh.sh instead of ssh (HYDRA_LAUNCHER_EXEC). The fake
ssh runs the proxy here, in a session of its own per host, and logs every launch per host; a host
is "down" while a file down-HOST exists (a launch there fails like an unreachable host) and "dies"
when the test kills every process of its sessions.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from disttrain.job.config import parse_config
from disttrain.job.resume import _check_restore
from disttrain.workloads import dp_invariant
from tests._mpirun import BYTECODE_ENV, OVERSUBSCRIBE_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ELASTIC = os.path.join(ROOT, "launchers", "elastic.sh")
FAKE_SSH = os.path.join(ROOT, "tests", "fake_ssh.sh")
STEPS = 40
STEPS_LONG = 300  # the host test kills a host at a moment it sees (rank 0 a 20 ms straggler: >= 6 s to see it)
JOB = ["--hidden", "32", "--dtype", "float64", "--global-batch-size", "16", "--warmup-steps", "2",
       "--log-every", "1", "--checkpoint-every", "5", "--algorithm", "ring"]
RESTART = re.compile(r"^elastic: restart .*$", re.M)
RTOL = 1e-9  # float64: only the reduction order differs between 1, 3 and 4 ranks (~1e-15 per step)


def _env(tmp_path, **extra):
    env = dict(os.environ, **OVERSUBSCRIBE_ENV, **BYTECODE_ENV, DISTTRAIN_COSTMODEL="defaults", PYTHONUNBUFFERED="1",
               TMPDIR=str(tmp_path), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    for k in [k for k in env if k.startswith("DISTTRAIN_FAULT")]:
        del env[k]
    env.update(extra)
    return env


def _job(tmp_path, steps=STEPS, extra=()):
    return [sys.executable, "-m", "disttrain.train", *JOB, "--steps", str(steps),
            "--checkpoint-dir", str(tmp_path / "ck"), "--metrics", str(tmp_path / "m.jsonl"), *extra]


def _elastic(tmp_path, opts, env=None, steps=STEPS, timeout=240, during=None, extra=()):
    """Run elastic.sh; `during(proc)` runs while it does. Returns (status, stdout, stderr)."""
    proc = subprocess.Popen(["bash", ELASTIC, *opts, "--", *_job(tmp_path, steps, extra)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or _env(tmp_path), start_new_session=True)
    try:
        if during:
            during(proc)
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, out, err


def _losses(path) -> dict:
    recs = [json.loads(ln) for ln in open(path)]
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps == sorted(set(steps)), f"metrics steps repeated or out of order: {steps}"
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run in ONE process on the same global batch: its loss per step."""
    d = tmp_path_factory.mktemp("ref")
    res = subprocess.run(_job(d), capture_output=True, text=True, env=_env(d), timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    return _losses(d / "m.jsonl")


def test_a_killed_rank_restarts_on_fewer_ranks_and_continues_the_loss_curve(tmp_path, reference):
    # rank 2 SIGKILLs itself in its 23rd step (disttrain/faults.py), after the checkpoint of step 20;
    # the relaunched processes count from 1 again and finish (20 steps) before a 23rd
    # an explicit --dp 4 sets the first launch; the restart passes --dp 3
    env = _env(tmp_path, DISTTRAIN_FAULT_INJECT="train-step", DISTTRAIN_FAULT_AT="23", DISTTRAIN_FAULT_RANK="2")
    rc, out, err = _elastic(tmp_path, ["--max-ranks", "4", "--min-ranks", "2"], env, extra=["--dp", "4"])
    assert rc == 0, out + err
    lines = RESTART.findall(err)
    assert lines == ["elastic: restart 1/3: rank 2 (host localhost) killed by signal 9; world 4 -> 3; "
                     "resuming from step 20"], err
    assert "[disttrain] 3 ranks (dp 3" in out and "resumed from" in out
    got = _losses(tmp_path / "m.jsonl")
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):  # steps 1-20 at 4 ranks, 21-40 at 3 (16 samples: 6, 5, 5 per rank)
        assert got[s] == pytest.approx(reference[s], rel=RTOL), f"step {s}"


def test_every_step_differs_from_a_wrong_curve(reference):
    """The oracle can fail: a run with another seed is far outside the tolerance."""
    assert abs(reference[STEPS] - reference[1]) > 1e3 * RTOL * abs(reference[1])


def test_a_departed_rank_is_named_and_too_few_ranks_left_is_a_clear_failure(tmp_path):
    # rank 1 quits (sys.exit(0)) in its 3rd step while the others wait for it: the job's departure
    # protocol aborts naming it (issue 14), the launcher attributes the failure from that line
    env = _env(tmp_path, DISTTRAIN_FAULT_INJECT="train-step", DISTTRAIN_FAULT_AT="3", DISTTRAIN_FAULT_RANK="1",
               DISTTRAIN_FAULT_ACTION="exit")
    rc, out, err = _elastic(tmp_path, ["--max-ranks", "4", "--min-ranks", "4"], env)
    assert rc == 69, out + err
    assert RESTART.findall(err) == []
    assert re.search(r"elastic: giving up after rank 1 \(host localhost\) left the job: 3 usable rank\(s\) on this "
                     r"host .* fewer than --min-ranks 4", err), err


def test_a_rank_that_exits_0_mid_run_is_a_failure_not_done(tmp_path):
    # rank 1 calls os._exit(0) in its 3rd step: no exit hook runs, Hydra SIGKILLs the others and
    # returns 0 - the launcher used to take the run as done (attack8); its records show ranks that
    # never exited on their own, so it is rank 1's departure
    env = _env(tmp_path, DISTTRAIN_FAULT_INJECT="train-step", DISTTRAIN_FAULT_AT="3", DISTTRAIN_FAULT_RANK="1",
               DISTTRAIN_FAULT_ACTION="_exit")
    rc, out, err = _elastic(tmp_path, ["--max-ranks", "4", "--min-ranks", "4"], env)
    assert rc == 69, out + err
    # Hydra's own status is 0 in some runs and not in others (who is torn down first): either way
    # the launcher attributes the failure to rank 1 (before: "done", exit 0, or "not restarting")
    assert "returned 0" not in err or "elastic: mpiexec returned 0, but rank(s) 0 2 3 never exited" in err, err
    assert re.search(r"elastic: giving up after rank 1 \(host localhost\) left the job \(exit status 0 before the job "
                     r"ended\): 3 usable rank\(s\)", err), err


def test_exhausted_restarts_are_a_clear_failure(tmp_path):
    # rank 0 dies in its 3rd step of every launch: launch, restart once, fail again, give up
    env = _env(tmp_path, DISTTRAIN_FAULT_INJECT="train-step", DISTTRAIN_FAULT_AT="3", DISTTRAIN_FAULT_RANK="0")
    rc, out, err = _elastic(tmp_path, ["--max-ranks", "3", "--max-restarts", "1"], env)
    assert rc == 75, out + err
    assert RESTART.findall(err) == ["elastic: restart 1/1: rank 0 (host localhost) killed by signal 9; "
                                    "world 3 -> 2; no valid checkpoint yet: starting fresh"], err
    assert "elastic: giving up: rank 0 (host localhost) killed by signal 9, and the 1 restart(s) of " \
           "--max-restarts are used up" in err


def test_the_jobs_own_failure_is_not_restarted(tmp_path):
    # non-finite gradients with --on-nonfinite stop: every rank exits 3 on its own - a verdict, not a death
    env = _env(tmp_path)
    proc = subprocess.run(["bash", ELASTIC, "--max-ranks", "2", "--", *_job(tmp_path), "--lr", "1e300",
                           "--on-nonfinite", "stop"], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert RESTART.findall(proc.stderr) == [] and "not restarting" in proc.stderr


def test_bad_launches_are_refused_before_anything_runs(tmp_path):
    env = _env(tmp_path)
    for opts, extra, want in [
        (["--max-ranks", "2"], ["--dp", "4"], "--dp 4 x pp x tp (1) needs 4 ranks"),
        (["--min-ranks", "3", "--max-ranks", "2"], [], "--min-ranks 3 exceeds --max-ranks 2"),
        (["--max-ranks", "2"], ["--steps", "many"], "configuration is refused"),
    ]:
        proc = subprocess.run(["bash", ELASTIC, *opts, "--", *_job(tmp_path), *extra], capture_output=True,
                              text=True, env=env, timeout=120)
        assert proc.returncode == 64 and want in proc.stderr, (opts, extra, proc.stderr)
    proc = subprocess.run(["bash", ELASTIC, "--", sys.executable, "-m", "disttrain.train", "--steps", "3"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 64 and "give the job --checkpoint-dir" in proc.stderr


def _sessions(log, host):
    return [int(ln.split()[2]) for ln in open(log) if ln.split()[:2] == ["launch", host]]


def _kill_host(log, host):
    """The host dies: every process of its sessions, parents (proxy, rank wrappers) first so that
    no rank can record its own death - as when a machine loses power."""
    pids = []
    for sid in _sessions(log, host):
        out = subprocess.run(["ps", "-o", "pid=,ppid=", "-s", str(sid)], capture_output=True, text=True).stdout
        pids += sorted((int(p) for p in out.split()[::2]), key=lambda p: p != sid)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_lost_host_is_dropped_and_an_added_host_is_used(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# emulated hosts (tests/fake_ssh.sh)\nhA:2\nhB:2\n")
    log = tmp_path / "launches.log"
    env = _env(tmp_path, HYDRA_LAUNCHER="ssh", HYDRA_LAUNCHER_EXEC=FAKE_SSH, FAKE_SSH_DIR=str(tmp_path),
               DISTTRAIN_FAULT_INJECT="train-step", DISTTRAIN_FAULT_ACTION="sleep:0.02", DISTTRAIN_FAULT_RANK="0")

    def during(proc):
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # mid-training: past the checkpoint of step 100
            try:
                if max(_losses(tmp_path / "m.jsonl"), default=0) > 100:
                    break
            except (OSError, ValueError):
                pass
            assert proc.poll() is None, "the job ended before the host could be killed"
            time.sleep(0.05)
        hosts.write_text(hosts.read_text() + "hC:2\n")  # a host joins; used at the next launch
        (tmp_path / "down-hB").touch()
        _kill_host(log, "hB")

    rc, out, err = _elastic(tmp_path, ["--hostfile", str(hosts), "--min-ranks", "2"], env, steps=STEPS_LONG,
                            during=during, extra=["--checkpoint-every", "50", "--log-every", "25"])
    assert rc == 0, out + err
    lines = RESTART.findall(err)
    assert len(lines) == 1 and "host hB" in lines[0] and "; world 4 -> 4; resuming from step" in lines[0], err
    launches = [ln.split()[1] for ln in open(log) if ln.startswith("launch")]
    # the first launch, (the probe of hA if hB vanished without a record), the relaunch on hA + hC
    assert sorted(launches[:2]) == ["hA", "hB"] and sorted(launches[-2:]) == ["hA", "hC"], launches
    assert "hB" not in launches[2:], launches
    assert sorted(_losses(tmp_path / "m.jsonl")) == list(range(25, STEPS_LONG + 1, 25))


def test_resuming_at_another_dp_is_refused_when_the_batches_depend_on_dp():
    """gnmt's bucketed batching shards the epoch per rank: a checkpoint of dp=2 resumed at dp=1
    would continue a different run - refused (like another seed) unless --resume-force."""
    rec = dict(extra=dict(config={}), step=1, layout=dict(dp=2, pp=1, tp=1), arrays={})
    bucketed = parse_config(["--model", "gnmt", "--batching", "bucketed", "--max-tokens", "0"])
    with pytest.raises(ValueError, match=r"dp=2 \(now 1\), and this workload's batches depend on dp"):
        _check_restore(bucketed, {}, "ck", rec, print)
    warned = []
    _check_restore(parse_config(["--model", "gnmt", "--batching", "bucketed", "--max-tokens", "0",
                                 "--resume-force"]), {}, "ck", rec, warned.append)
    assert "dp=2" in warned[0]
    _check_restore(parse_config(["--model", "mlp"]), {}, "ck", rec, print)  # one global batch at any dp
    assert dp_invariant(parse_config(["--model", "gnmt", "--batching", "load_balanced", "--max-tokens", "0"]))
    assert not dp_invariant(parse_config(["--model", "gnmt"]))  # a per-rank --max-tokens budget


def test_resuming_on_other_training_data_is_refused():
    """The pydocs corpus is read from the hosts' Python: a restart on hosts with another one would
    continue the run on other sentences under other token ids - refused unless --resume-force (a
    checkpoint without a digest, or a workload without one, is not judged)."""
    rec = dict(extra=dict(config={}, data_digest="aa"), step=1, layout=dict(dp=1, pp=1, tp=1), arrays={})
    cfg = parse_config(["--model", "gnmt"])
    with pytest.raises(ValueError, match=r"belongs to a different run: the training data"):
        _check_restore(cfg, {}, "ck", rec, print, "bb")
    _check_restore(cfg, {}, "ck", rec, print, "aa")
    _check_restore(cfg, {}, "ck", rec, print, None)
    warned = []
    _check_restore(parse_config(["--model", "gnmt", "--resume-force"]), {}, "ck", rec, warned.append, "bb")
    assert "training data" in warned[0]


def test_stopping_the_launcher_stops_the_job_without_a_restart(tmp_path):
    env = _env(tmp_path, DISTTRAIN_FAULT_INJECT="train-step", DISTTRAIN_FAULT_ACTION="sleep:0.05",
               DISTTRAIN_FAULT_RANK="0")

    def during(proc):
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("elastic.*/launch-0/rank-1")) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        records = list(tmp_path.glob("elastic.*/launch-0/rank-*"))
        during.pgids = [int(ln.split()[2]) for f in records for ln in open(f) if ln.startswith("start")]
        proc.send_signal(signal.SIGTERM)

    rc, out, err = _elastic(tmp_path, ["--max-ranks", "2"], env, steps=2000, during=during)
    assert rc == 143 and RESTART.findall(err) == [], out + err
    assert len(during.pgids) == 2
    for pg in during.pgids:  # nothing of the job outlives the launcher
        with pytest.raises(ProcessLookupError):
            os.killpg(pg, 0)


def test_resuming_under_another_sync_mode_or_embedding_update_is_refused():
    """attack5: --sync and --sparse-embeddings change the math like --lr does, but a checkpoint of
    --sync local:3 resumed under --sync sync (and lazy Adam under dense Adam) continued another run
    silently. Refused like another lr unless --resume-force; other models ignore the embeddings flag."""
    rec = dict(extra=dict(config=dict(sync="local:3", outer_lr=1.0, sparse_embeddings=True)), step=1,
               layout=dict(dp=1, pp=1, tp=1), arrays={})
    with pytest.raises(ValueError, match=r"belongs to a different run: sync='local:3' \(now 'sync'\)"):
        _check_restore(parse_config([]), {}, "ck", rec, print)
    with pytest.raises(ValueError, match=r"outer-lr=1.0 \(now 0.5\)"):
        _check_restore(parse_config(["--sync", "local:3", "--outer-lr", "0.5"]), {}, "ck", rec, print)
    _check_restore(parse_config(["--sync", "local:3"]), {}, "ck", rec, print)  # the same run
    _check_restore(parse_config(["--sync", "local:3", "--no-sparse-embeddings"]), {}, "ck", rec, print)  # mlp
    dlrm = dict(rec, extra=dict(config=dict(sync="sync", sparse_embeddings=True)))
    with pytest.raises(ValueError, match=r"sparse-embeddings=True \(now False\)"):
        _check_restore(parse_config(["--model", "dlrm", "--no-sparse-embeddings"]), {}, "ck", dlrm, print)
    _check_restore(parse_config(["--model", "dlrm"]), {}, "ck", dlrm, print)
    warned = []
    _check_restore(parse_config(["--resume-force"]), {}, "ck", rec, warned.append)
    assert "sync='local:3'" in warned[0]
