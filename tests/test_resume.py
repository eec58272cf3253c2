"""Checkpoint / resume robustness of the main job at 2 ranks (issue 14 and 10), on the directory
format of disttrain.checkpoint: a resume refuses a checkpoint that does not fit (array shapes,
missing optimizer state, a different run) with a message, survives FIFOs and torn metrics lines,
continues a logging interval exactly, and a checkpoint that cannot be written warns (or stops)
on every rank instead of killing the job."""
import json
import os
import time


from disttrain.checkpoint import manifest

from ._mpirun import run

ENV = {"DISTTRAIN_COSTMODEL": "defaults"}
COMMON = ["--steps", "40", "--log-every", "10", "--global-batch-size", "32", "--hidden", "64"]


def _train(*flags, timeout=90):
    t = time.monotonic()
    res = run(2, ["-m", "disttrain.train", *COMMON, *flags], timeout=timeout, env=ENV)
    assert time.monotonic() - t < 60, res.stdout
    return res


def _records(path):
    return [json.loads(x) for x in open(path).read().splitlines()]


def _losses(path):
    return [(r["step"], r["loss"], r["lr"], r["skipped_steps"]) for r in _records(path) if "loss" in r]


def _stopped_at(tmp_path, step, *flags):
    ck = tmp_path / "ck"
    res = _train("--checkpoint-dir", str(ck), "--stop-after-steps", str(step), *flags)
    assert res.returncode == 0 and f"stopped after step {step}" in res.stdout, res.stdout
    return ck


def test_resume_off_a_logging_step_with_a_torn_metrics_line_matches_the_uninterrupted_run(tmp_path):
    ref = _train("--metrics", str(tmp_path / "a.jsonl"))
    assert ref.returncode == 0, ref.stdout
    m = tmp_path / "b.jsonl"
    ck = _stopped_at(tmp_path, 25, "--metrics", str(m))  # 25: halfway through the interval 21..30
    with open(m, "a") as f:
        f.write('{"step": 30, "loss": 0.1')  # the run was killed in the middle of a write
    res = _train("--metrics", str(m), "--checkpoint-dir", str(ck), "--resume")
    assert res.returncode == 0 and "step-00000025" in res.stdout, res.stdout
    assert "dropped 1 unreadable line" in res.stdout, res.stdout
    # step 30's loss averages steps 21..30, 21..25 of which ran before the interruption: bit for bit
    assert _losses(m) == _losses(tmp_path / "a.jsonl")
    assert _records(m)[-1]["final"]


def test_resume_refuses_a_different_run_unless_forced(tmp_path):
    ck = _stopped_at(tmp_path, 20)
    res = _train("--checkpoint-dir", str(ck), "--resume", "--seed", "1", "--global-batch-size", "48",
                 "--warmup-steps", "5", "--steps", "50")
    assert res.returncode == 2 and res.stdout.count("belongs to a different run") == 1, res.stdout
    for part in ("seed=0 (now 1)", "global-batch-size=32 (now 48)", "warmup-steps=30 (now 5)", "steps=40 (now 50)",
                 "--resume-force"):
        assert part in res.stdout, (part, res.stdout)
    res = _train("--checkpoint-dir", str(ck), "--resume", "--seed", "1", "--resume-force")
    assert res.returncode == 0 and "warning: --resume-force" in res.stdout and "seed=0 (now 1)" in res.stdout
    assert "resumed from" in res.stdout, res.stdout


def _rewrite(path, edit):
    rec = manifest.read(str(path))
    edit(rec)
    os.remove(path / manifest.MANIFEST)
    manifest.write(str(path / manifest.MANIFEST), rec)  # a valid checksum: only the contents are wrong


def test_resume_refuses_arrays_that_do_not_fit_and_missing_optimizer_state(tmp_path):
    ck = _stopped_at(tmp_path, 20)
    good = (ck / "step-00000020" / manifest.MANIFEST).read_bytes()
    name = "layers.0.weight"

    def small(rec):
        rec["arrays"][name]["shape"] = [1, 64]

    _rewrite(ck / "step-00000020", small)
    res = _train("--checkpoint-dir", str(ck), "--resume")
    assert res.returncode == 2 and f"parameter '{name}' has shape (1, 64)" in res.stdout, res.stdout
    assert "(64, 64) in the model" in res.stdout and "Traceback" not in res.stdout
    (ck / "step-00000020" / manifest.MANIFEST).write_bytes(good)

    def no_momentum(rec):
        del rec["arrays"][f"optimizer/momentum/{name}"]
        rec["entries"] = [e for e in rec["entries"] if e["name"] != f"optimizer/momentum/{name}"]

    _rewrite(ck / "step-00000020", no_momentum)
    res = _train("--checkpoint-dir", str(ck), "--resume")
    assert res.returncode == 2 and f"lacks optimizer state ['{name}/momentum']" in res.stdout, res.stdout


def test_unexpected_error_while_reading_reaches_every_rank(tmp_path):
    ck = _stopped_at(tmp_path, 20)
    _rewrite(ck / "step-00000020", lambda rec: rec["extra"].update(config=None))
    res = _train("--checkpoint-dir", str(ck), "--resume")
    assert res.returncode == 2 and "cannot resume" in res.stdout and "Traceback" not in res.stdout, res.stdout


def test_fifo_named_like_the_newest_checkpoint_is_skipped_on_resume(tmp_path):
    ck = _stopped_at(tmp_path, 20)
    os.mkfifo(ck / "step-00000030")
    (ck / "step-00000025").mkdir()
    os.mkfifo(ck / "step-00000025" / manifest.MANIFEST)  # a FIFO where the manifest should be
    res = _train("--checkpoint-dir", str(ck), "--resume", timeout=60)
    assert res.returncode == 0, res.stdout
    assert "step-00000030: not a directory" in res.stdout and "resumed from" in res.stdout
    assert "step-00000025/manifest.json is not a regular file" in res.stdout, res.stdout
    assert "resumed from" in res.stdout and "step-00000020 at step 20" in res.stdout


def test_failed_checkpoint_write_warns_on_every_rank_and_training_continues(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "step-00000010").write_text("a file in the way of step 10's checkpoint: its rename fails")
    res = _train("--steps", "20", "--checkpoint-dir", str(ck), "--checkpoint-every", "10")
    assert res.returncode == 0, res.stdout
    for r in (0, 1):
        assert f"rank {r}: warning: step 10: checkpoint" in res.stdout, res.stdout
    assert "training continues" in res.stdout and "step     20/20" in res.stdout
    names = sorted(os.listdir(ck))
    assert names == ["step-00000010", "step-00000020"], names  # no temporary left behind
    res = _train("--steps", "20", "--checkpoint-dir", str(ck), "--checkpoint-every", "10",
                 "--on-checkpoint-error", "stop")
    assert res.returncode == 4, res.stdout
    for r in (0, 1):
        assert f"disttrain.train: rank {r}: step 10: checkpoint" in res.stdout, res.stdout
    assert "stopping (--on-checkpoint-error stop)" in res.stdout and "step     20/20" not in res.stdout
    assert not any(".tmp-" in n for n in os.listdir(ck))


def test_truncating_metrics_drops_torn_and_non_utf8_lines(tmp_path):
    from disttrain.job import truncate_metrics

    p = tmp_path / "m.jsonl"
    good = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (10, 20, 30)]
    p.write_bytes("".join(good).encode() + b'{"step": 40, "lo\xff\x00\x00')
    warned = []
    truncate_metrics(str(p), 20, warn=warned.append)
    assert p.read_text() == "".join(good[:2]) and len(warned) == 1 and "dropped 1 unreadable line" in warned[0]
