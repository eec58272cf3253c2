"""Main-job configuration: types and ranges checked with one message naming the field and what it
accepts, exit status 2 on every rank without tracebacks, and --help explaining every flag."""
import dataclasses
import time

import pytest

from disttrain.job import ConfigError, TrainConfig, make_parser, parse_config

from ._mpirun import run


@pytest.mark.parametrize("toml, msg", [
    ('steps = "10"\n', "steps in config file"),
    ("steps = 1.5\n", "must be an integer"),
    ("lr = true\n", "lr in config file"),
    ("overlap = 1\n", "must be true or false"),
    ('lr = nan\n', "must be a number (finite, > 0) (got nan)"),
    ("momentum = -1\n", "momentum must be in [0, 1)"),
])
def test_config_file_values_are_type_and_range_checked(tmp_path, toml, msg):
    p = tmp_path / "c.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError) as e:
        parse_config(["--config", str(p)])
    assert msg in str(e.value), str(e.value)


@pytest.mark.parametrize("flags, msg", [
    (["--steps", "1.5"], "--steps must be an integer (>= 1) (got '1.5')"),
    (["--steps", "ten"], "--steps must be an integer"),
    (["--bucket-mb", "0"], "bucket-mb must be positive"),
    (["--lr", "nan"], "--lr must be a number (finite, > 0) (got nan)"),
    (["--lr", "inf"], "--lr must be a number (finite, > 0) (got inf)"),
    (["--lr", "-0.1"], "lr must be positive"),
    (["--warmup-steps", "-1"], "warmup-steps must be >= 0"),
    (["--momentum", "-1"], "momentum must be in [0, 1)"),
    (["--momentum", "1"], "momentum must be in [0, 1)"),
    (["--checkpoint-every", "-1"], "checkpoint-every must be >= 0"),
    (["--stop-after-steps", "-1"], "stop-after-steps must be >= 0"),
    (["--max-skipped-steps", "-1"], "max-skipped-steps must be >= 0"),
    (["--on-checkpoint-error", "ignore"], "on-checkpoint-error must be 'warn' or 'stop'"),
    (["--metrics", "/nonexistent-dir/m.jsonl"], "metrics: the directory of '/nonexistent-dir/m.jsonl' does not exist"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_flag_values_are_checked(flags, msg):
    with pytest.raises(ConfigError) as e:
        parse_config(flags)
    assert msg in str(e.value), str(e.value)


def test_valid_values_still_parse(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("steps = 10\nlr = 1\nbucket-mb = 0.5\noverlap = false\n")
    cfg = parse_config(["--config", str(p), "--momentum", "0", "--metrics", str(tmp_path / "m.jsonl")])
    assert (cfg.steps, cfg.lr, cfg.bucket_mb, cfg.overlap, cfg.momentum) == (10, 1.0, 0.5, False, 0.0)
    assert isinstance(cfg.lr, float)


def test_help_explains_every_flag_with_its_default_and_choices(capsys):
    ap = make_parser()
    actions = {a.dest: a for a in ap._actions}
    for f in dataclasses.fields(TrainConfig):
        h = actions[f.name].help
        assert h and "(default: " in h and len(h) > 30, (f.name, h)
        for c in f.metadata.get("choices") or []:
            assert str(c) in h, (f.name, c)
    with pytest.raises(SystemExit) as e:
        parse_config(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--on-checkpoint-error" in out and "--resume-force" in out and "--max-skipped-steps" in out


def test_configuration_errors_print_one_message_from_rank_0_and_exit_2(tmp_path):
    for flags, msg in [(["--lr", "nan"], "--lr must be a number (finite, > 0)"),
                       (["--metrics", str(tmp_path / "missing" / "m.jsonl")], "does not exist"),
                       (["--steps", "x"], "--steps must be an integer")]:
        t = time.monotonic()
        res = run(2, ["-m", "disttrain.train", *flags], timeout=60, env={"DISTTRAIN_COSTMODEL": "defaults"})
        assert res.returncode == 2, res.stdout
        assert res.stdout.count("configuration error") == 1 and msg in res.stdout, res.stdout
        assert "Traceback" not in res.stdout and "usage:" not in res.stdout, res.stdout
        assert time.monotonic() - t < 30


def test_help_under_mpiexec_is_printed_once():
    res = run(2, ["-m", "disttrain.train", "--help"], timeout=60)
    assert res.returncode == 0 and res.stdout.count("usage: python -m disttrain.train") == 1, res.stdout
