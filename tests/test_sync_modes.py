"""The main job under --sync local:H / hybrid:G and --straggler (issue 18): each mode trains the
digits MLP to >= 95% test accuracy, records wait_s and bytes_sent_per_step, and bad settings end
every rank with one message (exit 2), never a hang."""
import json

import pytest

from disttrain.job.metrics import merge_sync, sync_summary
from disttrain.job.straggler import Straggler, parse, problems

from ._mpirun import run, run_main_jobs

ENV = {"DISTTRAIN_COSTMODEL": "defaults"}


@pytest.mark.parametrize("sync", ["local:4", "hybrid:2"])
def test_mode_trains_digits_to_95_percent(tmp_path, sync):
    m = tmp_path / "m.jsonl"
    res = run(4, ["-m", "disttrain.train", "--sync", sync, "--steps", "200", "--log-every", "100",
                  "--metrics", str(m)], timeout=240, env=ENV)
    assert res.returncode == 0, res.stdout
    recs = [json.loads(x) for x in open(m)]
    final = recs[-1]
    assert final["final"] and final["test_accuracy"] >= 0.95, final
    logged = [r for r in recs if "loss" in r]
    assert len(logged) == 2
    for r in logged:  # every rank pays for the exchange: params (~84k floats) once per period
        assert r["wait_s"] >= 0 and r["bytes_sent_per_step"] > 0 and r["sync_period"] == 4, r
    assert "wait" in res.stdout and "KiB/step" in res.stdout


def test_straggler_is_the_slowest_rank(tmp_path):
    m = tmp_path / "m.jsonl"
    res = run(3, ["-m", "disttrain.train", "--steps", "20", "--log-every", "20", "--straggler", "1:20",
                  "--metrics", str(m)], timeout=120, env=ENV)
    assert res.returncode == 0, res.stdout
    rec = json.loads(open(m).readline())
    # the straggler waits for nobody (it is the slowest); the others wait for it at every step
    w = rec["imbalance_wait_s"]
    assert w[1] == min(w) and min(w[0], w[2]) > 2 * w[1] + 1e-3, rec


BAD = {  # name: (flags, message)
    "straggler-spec": (["--straggler", "1:x"], "straggler must be RANK:FACTOR"),
    "straggler-rank": (["--straggler", "5:2"], "rank 5 does not exist (the job has 2 ranks)"),
    "hybrid-groups": (["--sync", "hybrid:3"], "hybrid:3 needs at least 3 data-parallel ranks (dp is 2)"),
    "local-checkpoints": (["--sync", "local:4", "--checkpoint-dir", "CK", "--checkpoint-every", "6"],
                          "not a multiple of the exchange"),
}


@pytest.fixture(scope="module")
def bad_settings(tmp_path_factory):
    """Every BAD flag set through disttrain.job.main in one 2-rank launch (tests/job_batch.py: why;
    the real launch below keeps the process's exit status)."""
    d = tmp_path_factory.mktemp("bad")
    return run_main_jobs({k: (2, ["--steps", "5", *[str(d / "ck") if a == "CK" else a for a in flags]])
                          for k, (flags, _) in BAD.items()}, d, timeout=60, env=ENV)


@pytest.mark.parametrize("name", list(BAD))
def test_bad_settings_stop_every_rank_with_one_message(bad_settings, name):
    job, message = bad_settings[name], BAD[name][1]
    assert job.rcs == [2, 2] and message in job.logs[0] and job.logs[0].count("configuration error") == 1, job.out
    assert not job.logs[1], job.out  # one message, from rank 0


def test_a_bad_setting_found_by_the_sync_mode_ends_the_launched_job():
    """The sync mode's own refusal (job/loop._prepare, after set-up) through a real launch."""
    res = run(2, ["-m", "disttrain.train", "--steps", "5", "--sync", "hybrid:3"], timeout=60, env=ENV)
    assert res.returncode == 2 and "needs at least 3 data-parallel ranks" in res.stdout, res.stdout
    assert res.stdout.count("configuration error") == 1, res.stdout


def test_a_worker_leaving_between_exchanges_ends_the_job_with_its_name():
    """Rank 2 quits after its 6th step (mid-period): the others meet its absence at the step-8
    exchange, and the departure protocol (runtime.py) ends the job naming it - no hang."""
    env = dict(ENV, DISTTRAIN_FAULT_INJECT="train-step", DISTTRAIN_FAULT_AT="6", DISTTRAIN_FAULT_RANK="2",
               DISTTRAIN_FAULT_ACTION="exit")
    res = run(3, ["-m", "disttrain.train", "--sync", "local:4", "--steps", "40"], timeout=120, env=env)
    assert res.returncode not in (0, -9) and "rank 2 has left the job" in res.stdout, res.stdout


def test_straggler_spec_and_sleep():
    assert parse("1:3") == (1, 3.0) and parse("0:1.5") == (0, 1.5)
    for bad in ("1", "x:3", "-1:3", "1:0.5", "1:inf", "1:nan", ":"):
        assert problems(bad) and "RANK:FACTOR" in problems(bad)[0], bad
    assert problems("") == []
    s = Straggler("1:3", 1, 2)
    s.delay(0.01)
    assert s.active and abs(s.slept - 0.02) < 1e-12
    other = Straggler("1:3", 0, 2)
    other.delay(0.01)
    assert not other.active and other.slept == 0
    with pytest.raises(ValueError, match="rank 2 does not exist"):
        Straggler("2:3", 0, 2)


def test_mode_metrics_add_to_data_parallel_wait_and_bytes():
    rec = dict(wait_s=0.01, bytes_sent_per_step=100.0)
    merge_sync(rec, dict(wait_s=0.02, bytes_sent_per_step=50.0, staleness_mean=1.5, staleness_max=3))
    assert rec == dict(wait_s=0.03, bytes_sent_per_step=150.0, staleness_mean=1.5, staleness_max=3)
    assert sync_summary(rec) == "wait 30.0 ms, sent 0 KiB/step, staleness 1.50 (max 3)"
