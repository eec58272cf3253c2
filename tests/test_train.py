"""The main job end to end under mpiexec: accuracy, exact resume, clear configuration errors."""
import json
import os
import time

import pytest

from ._mpirun import run

ENV = {"DISTTRAIN_COSTMODEL": "defaults"}


def train(n, *flags, timeout=120):
    t = time.monotonic()
    res = run(n, ["-m", "disttrain.train", *flags], timeout=timeout, env=ENV)
    return res, time.monotonic() - t


def test_trains_digits_to_95_percent_on_2_ranks_in_under_a_minute(tmp_path):
    res, took = train(2, "--metrics", str(tmp_path / "m.jsonl"))
    assert res.returncode == 0, res.stdout
    final = json.loads(open(tmp_path / "m.jsonl").read().splitlines()[-1])
    assert final["final"] and final["test_accuracy"] >= 0.95, final
    assert took < 60, f"{took:.0f} s"
    assert "step    600/600" in res.stdout and "samples/s" in res.stdout


def losses(path):
    return [(r["step"], r["loss"], r["lr"]) for r in map(json.loads, open(path).read().splitlines()) if "loss" in r]


@pytest.mark.parametrize("compression", ["none", "topk:0.05"])
def test_interrupted_and_resumed_run_reproduces_the_uninterrupted_one(tmp_path, compression):
    """With error feedback the residuals of every rank are training state: without them in the
    checkpoint the resumed losses would differ."""
    common = ["--steps", "60", "--log-every", "10", "--checkpoint-every", "20", "--compression", compression]
    a, _ = train(3, *common, "--global-batch-size", "48", "--metrics", str(tmp_path / "a.jsonl"),
                 "--checkpoint-dir", str(tmp_path / "ca"))
    b1, _ = train(3, *common, "--global-batch-size", "48", "--metrics", str(tmp_path / "b.jsonl"),
                  "--checkpoint-dir", str(tmp_path / "cb"), "--stop-after-steps", "30")
    assert "stopped after step 30" in b1.stdout, b1.stdout
    b2, _ = train(3, *common, "--global-batch-size", "48", "--metrics", str(tmp_path / "b.jsonl"),
                  "--checkpoint-dir", str(tmp_path / "cb"), "--resume")
    assert a.returncode == b1.returncode == b2.returncode == 0, a.stdout + b1.stdout + b2.stdout
    assert "resumed from" in b2.stdout and "step-00000030" in b2.stdout
    assert losses(tmp_path / "a.jsonl") == losses(tmp_path / "b.jsonl")  # bit for bit, every logged step


def test_configuration_errors_end_every_rank_with_a_message(tmp_path):
    # (a global batch the 3 ranks do not divide is no longer an error: shares differ by one sample,
    # tests/mpi/test_uneven_batch.py and tests/test_elastic.py check the result against one process)
    for flags, msg in [(["--steps", "0"], "steps must be positive"),
                       (["--optimizer", "rmsprop"], "optimizer must be"),
                       (["--compression", "gzip"], "unknown compression 'gzip'"),
                       (["--compression", "bf16", "--algorithm", "tree"], "16-bit-wire ring"),
                       (["--resume"], "--resume needs --checkpoint-dir"),
                       (["--resume", "--global-batch-size", "48", "--checkpoint-dir", str(tmp_path / "none")], "no valid checkpoint")]:
        res, took = train(3, *flags, timeout=60)
        assert res.returncode != 0 and msg in res.stdout, (flags, res.stdout)
        assert took < 30
    cfg = tmp_path / "c.toml"
    cfg.write_text('steps = 20\nbogus_key = 1\n')
    res, _ = train(1, "--config", str(cfg))
    assert res.returncode != 0 and "unknown configuration keys ['bogus_key']" in res.stdout
    os.remove(cfg)


def test_gnmt_loss_falls_under_data_parallelism_with_bucketing_metrics(tmp_path):
    """The seq2seq workload through the main job: token-weighted loss falls steadily, and every
    logged step reports padding, cross-rank imbalance and each rank's synchronisation wait."""
    res, _ = train(2, "--model", "gnmt", "--steps", "80", "--log-every", "20", "--max-tokens", "600",
                   "--metrics", str(tmp_path / "g.jsonl"), timeout=180)
    assert res.returncode == 0, res.stdout
    recs = [json.loads(ln) for ln in open(tmp_path / "g.jsonl").read().splitlines()]
    steps = [r for r in recs if "loss" in r]
    loss = [r["loss"] for r in steps]
    assert len(loss) == 4 and all(a > b for a, b in zip(loss, loss[1:])), loss
    assert loss[-1] < 0.8 * loss[0]
    for r in steps:
        assert 0 <= r["padding"] < 0.1 and 1 <= r["imbalance"] <= r["imbalance_max"] < 1.3, r
        assert len(r["sync_wait_s"]) == len(r["imbalance_wait_s"]) == 2 and r["tokens_per_s"] > 0
    assert recs[-1]["final"] and 0 < recs[-1]["test_token_accuracy"] <= 1


def test_gnmt_configuration_errors(tmp_path):
    for flags, msg in [(["--batching", "sorted"], "batching must be one of"),
                       (["--max-tokens", "10"], "smaller than the longest sample"),
                       (["--hidden", "64,128"], "EMB,HIDDEN,LAYERS"),
                       (["--dataset", "digits"], "trains on dataset 'pydocs'")]:
        res, took = train(2, "--model", "gnmt", *flags, timeout=60)
        assert res.returncode != 0 and msg in res.stdout, (flags, res.stdout)
    res, _ = train(1, "--max-tokens", "500", timeout=60)  # mlp batches are fixed-size
    assert res.returncode != 0 and "max-tokens" in res.stdout


def test_hybrid_meshes_reproduce_the_one_process_run(tmp_path):
    """--dp/--pp/--tp through the main job: the same losses and accuracy as one process on the
    global batch (float64, so only summation order differs)."""
    common = ["--steps", "30", "--log-every", "10", "--dtype", "float64", "--hidden", "64,48,32"]
    runs = {"one": (1, []), "dp2xpp2": (4, ["--dp", "2", "--pp", "2", "--micro-batches", "4"]),
            "pp2xtp2": (4, ["--pp", "2", "--tp", "2", "--schedule", "gpipe", "--micro-batches", "8"]),
            "tp2": (2, ["--tp", "2"]),
            "interleaved": (2, ["--pp", "2", "--schedule", "interleaved", "--virtual-stages", "2",
                                "--micro-batches", "4", "--recompute", "selective"]),
            "zb1": (2, ["--pp", "2", "--schedule", "zb1", "--recompute", "full", "--micro-batches", "4"])}
    got = {}
    for name, (n, flags) in runs.items():
        res, _ = train(n, *common, *flags, "--metrics", str(tmp_path / f"{name}.jsonl"))
        assert res.returncode == 0, res.stdout
        recs = [json.loads(ln) for ln in open(tmp_path / f"{name}.jsonl")]
        got[name] = ([r["loss"] for r in recs if "loss" in r], recs[-1]["test_accuracy"])
        if "--pp" in flags:
            assert "pipeline_idle" in recs[0] and len(recs[0]["pipeline_peak_live"]) == n
    want_losses, want_acc = got.pop("one")
    for name, (ls, acc) in got.items():
        assert ls == pytest.approx(want_losses, rel=1e-9), name
        assert acc == want_acc, name


def test_gnmt_and_dlrm_pipelines_reproduce_the_one_process_run(tmp_path):
    """--pp for gnmt (tuples of encoder states and lengths between stages, uneven micro-batches
    weighted by target tokens; --tp splits its output layer by vocabulary) and dlrm (embedding
    vectors carried past the bottom MLP; --tp splits its MLPs): the losses and test metrics of one
    process (float64)."""
    gnmt = ["--model", "gnmt", "--hidden", "6,8,1", "--vocab-size", "40", "--max-tokens", "0", "--global-batch-size",
            "10", "--micro-batches", "3", "--steps", "6", "--log-every", "2"]
    dlrm = ["--model", "dlrm", "--tables", "50,20,7", "--samples", "400", "--hidden", "4,8,8", "--global-batch-size",
            "24", "--steps", "6", "--log-every", "2"]
    runs = {"gnmt": {"one": (1, []), "dp2xpp2": (4, ["--pp", "2", "--schedule", "zb1", "--recompute", "full"]),
                     "pp2xtp2": (4, ["--pp", "2", "--tp", "2"])},  # tp: the vocabulary-parallel output layer
            "dlrm": {"one": (1, []), "pp2xtp2": (4, ["--pp", "2", "--tp", "2"])}}  # pp3: tests/test_reshard.py
    for model, flags in (("gnmt", gnmt), ("dlrm", dlrm)):
        got = {}
        for name, (n, extra) in runs[model].items():
            res, _ = train(n, *flags, *extra, "--dtype", "float64", "--metrics", str(tmp_path / f"{model}{name}.jsonl"))
            assert res.returncode == 0, res.stdout
            recs = [json.loads(ln) for ln in open(tmp_path / f"{model}{name}.jsonl")]
            got[name] = ([r["loss"] for r in recs if "loss" in r], {k: v for k, v in recs[-1].items() if "test" in k})
        want = got.pop("one")
        assert len(want[0]) == 3 and want[1], want
        for name, (ls, test) in got.items():
            assert ls == pytest.approx(want[0], rel=1e-9), (model, name)
            assert test == pytest.approx(want[1], rel=1e-9), (model, name)


def test_sharded_runs_reproduce_the_unsharded_run(tmp_path):
    """--shard optimizer|gradients|full (ZeRO-1/2/3) through the main job: the losses and accuracy of
    --shard none (float64; reduce-scatter + allgather instead of allreduce: summation order only),
    also on a dp 2 x tp 2 mesh (checkpoints of sharded runs: tests/test_reshard.py)."""
    common = ["--steps", "20", "--log-every", "10", "--dtype", "float64", "--hidden", "40,24", "--optimizer",
              "adam", "--lr", "0.01", "--global-batch-size", "48"]
    got = {}  # gradients runs on a dp 2 x tp 2 mesh: the same global batch, so the same run as dp 3
    for name, (n, flags) in {"none": (3, []), "optimizer": (3, ["--shard", "optimizer"]),
                             "full": (3, ["--shard", "full"]),
                             "tp-gradients": (4, ["--tp", "2", "--shard", "gradients"])}.items():
        res, _ = train(n, *common, *flags, "--metrics", str(tmp_path / f"{name}.jsonl"))
        assert res.returncode == 0, res.stdout
        recs = [json.loads(ln) for ln in open(tmp_path / f"{name}.jsonl")]
        got[name] = ([r["loss"] for r in recs if "loss" in r], recs[-1]["test_accuracy"])
    for name in ("optimizer", "full", "tp-gradients"):
        want = got["none"]
        assert got[name][0] == pytest.approx(want[0], rel=1e-9), name
        assert got[name][1] == want[1], name


def test_mesh_configuration_errors_end_every_rank_with_a_message():
    for n, flags, msg in [(3, ["--pp", "2"], "but the job has 3: launch 2 ranks"),
                          (4, ["--pp", "2", "--micro-batches", "5"], "divisible by 5 micro-batches"),
                          (4, ["--pp", "4", "--hidden", "64"], "2 layers cannot fill 4 pipeline stages"),
                          (2, ["--tp", "2", "--hidden", "255,256"], "not divisible by the tensor-parallel size 2"),
                          (2, ["--pp", "2", "--schedule", "zigzag"], "schedule must be one of"),
                          (2, ["--pp", "2", "--schedule", "interleaved", "--virtual-stages", "2",
                               "--micro-batches", "3"], "must be a multiple of 2"),
                          (1, ["--recompute", "full"], "use them with --pp > 1"),
                          (3, ["--model", "gnmt", "--tp", "3"], "out_features 200 is not divisible by the tensor-parallel size 3"),
                          (3, ["--model", "transformer", "--tp", "3", "--hidden", "32,4,2"],
                           "heads 4 is not divisible by the tensor-parallel size 3"),
                          (2, ["--model", "dlrm", "--sharding", "column"], "sharding must be one of"),
                          (2, ["--model", "dlrm", "--tables", "10,x"], "tables: expected rows per table"),
                          (2, ["--model", "dlrm", "--optimizer", "lamb"], "lamb cannot apply row-sparse embedding")]:
        res, took = train(n, *flags, timeout=60)
        assert res.returncode != 0 and msg in res.stdout, (flags, res.stdout)
        assert took < 30


def test_dlrm_sharded_main_job_reproduces_one_process_and_learns(tmp_path):
    """--model dlrm: table- and row-wise sharded embeddings (AllToAll) + data-parallel MLPs give
    the one-process losses (float64), and the held-out log-loss beats the base rate."""
    common = ["--model", "dlrm", "--steps", "40", "--log-every", "10", "--dtype", "float64", "--samples", "12000",
              "--tables", "3000,500,40,7", "--global-batch-size", "96"]
    got = {}
    for name, n, flags in [("one", 1, []), ("table3", 3, ["--sharding", "table"]), ("row2", 2, ["--sharding", "row"])]:
        res, _ = train(n, *common, *flags, "--metrics", str(tmp_path / f"{name}.jsonl"))
        assert res.returncode == 0, res.stdout
        recs = [json.loads(ln) for ln in open(tmp_path / f"{name}.jsonl")]
        got[name] = [r["loss"] for r in recs if "loss" in r]
        if n > 1:
            assert recs[0]["embedding_alltoall_bytes"] > 0
        assert "sparse updates" in res.stdout  # the default: row-sparse gradients, lazy Adam
        final = recs[-1]
    for name in ("table3", "row2"):
        assert got[name] == pytest.approx(got["one"], rel=1e-9), name
    assert final["test_logloss"] < final["base_rate_logloss"] - 0.02, final


def test_transformer_meshes_reproduce_the_one_process_run(tmp_path):
    """The tensor-parallel (heads split) and pipelined transformer LM through the main job gives
    the one-process losses and held-out metrics (float64)."""
    common = ["--model", "transformer", "--steps", "20", "--log-every", "10", "--dtype", "float64",
              "--hidden", "32,4,3", "--seq-len", "16"]
    got = {}
    for name, n, flags in [("one", 1, []), ("tp2", 2, ["--tp", "2"]),
                           ("pp2xtp2", 4, ["--pp", "2", "--tp", "2", "--schedule", "gpipe"]),
                           ("pp2zb1", 2, ["--pp", "2", "--schedule", "zb1", "--recompute", "selective"])]:
        res, _ = train(n, *common, *flags, "--metrics", str(tmp_path / f"{name}.jsonl"))
        assert res.returncode == 0, res.stdout
        recs = [json.loads(ln) for ln in open(tmp_path / f"{name}.jsonl")]
        got[name] = ([r["loss"] for r in recs if "loss" in r], recs[-1]["test_loss"])
    for name in ("tp2", "pp2xtp2", "pp2zb1"):
        assert got[name][0] == pytest.approx(got["one"][0], rel=1e-9), name
        assert got[name][1] == pytest.approx(got["one"][1], rel=1e-9), name
