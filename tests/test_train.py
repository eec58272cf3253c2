"""The main job end to end under mpiexec: accuracy, exact resume, clear configuration errors."""
import json
import os
import time

import pytest

from ._mpirun import run, run_main_jobs

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
    checkpoint the resumed losses would differ. The uninterrupted run and the interrupted one share
    a launch (tests/job_batch.py); the resume is a fresh process, so that all it has is the
    checkpoint."""
    common = ["--steps", "60", "--log-every", "10", "--checkpoint-every", "20", "--compression", compression,
              "--global-batch-size", "48"]
    jobs = run_main_jobs({"a": (3, [*common, "--metrics", tmp_path / "a.jsonl", "--checkpoint-dir", tmp_path / "ca"]),
                          "b1": (3, [*common, "--metrics", tmp_path / "b.jsonl", "--checkpoint-dir", tmp_path / "cb",
                                     "--stop-after-steps", "30"])}, tmp_path, timeout=120, env=ENV)
    assert jobs["a"].rcs == jobs["b1"].rcs == [0] * 3, jobs["a"].out + jobs["b1"].out
    assert "stopped after step 30" in jobs["b1"].logs[0], jobs["b1"].out
    b2, _ = train(3, *common, "--metrics", str(tmp_path / "b.jsonl"), "--checkpoint-dir", str(tmp_path / "cb"),
                  "--resume")
    assert b2.returncode == 0, b2.stdout
    assert "resumed from" in b2.stdout and "step-00000030" in b2.stdout
    assert len(losses(tmp_path / "a.jsonl")) == 6
    assert losses(tmp_path / "a.jsonl") == losses(tmp_path / "b.jsonl")  # bit for bit, every logged step


# Refused flag sets. "Every rank ends with one message and exit status 2" is one code path per
# place the job refuses (disttrain/job/loop.py: _agreed_config for what the flags and files say,
# _prepare for what only set-up finds - the mesh, the data - and for a checkpoint that cannot be
# resumed); each path keeps one real launch (`python -m disttrain.train`: the process's exit
# status, the merged output, promptness). The other flag sets' messages run through the same
# main() in one launch per rank count (tests/job_batch.py): 21 launches fewer, ~25 s, and
# stricter per run - rank 0's output holds the message, the other ranks' output is empty.
REFUSED = {  # name: (ranks, flags, message)
    "steps": (3, ["--steps", "0"], "steps must be positive"),
    "optimizer": (3, ["--optimizer", "rmsprop"], "optimizer must be"),
    "compression": (3, ["--compression", "gzip"], "unknown compression 'gzip'"),
    "bf16-tree": (3, ["--compression", "bf16", "--algorithm", "tree"], "16-bit-wire ring"),
    "resume-no-dir": (3, ["--resume"], "--resume needs --checkpoint-dir"),
    "config-file": (3, ["--config", "CFG"], "unknown configuration keys ['bogus_key']"),
    "gnmt-batching": (2, ["--model", "gnmt", "--batching", "sorted"], "batching must be one of"),
    "gnmt-max-tokens": (2, ["--model", "gnmt", "--max-tokens", "10"], "smaller than the longest sample"),
    "gnmt-hidden": (2, ["--model", "gnmt", "--hidden", "64,128"], "EMB,HIDDEN,LAYERS"),
    "gnmt-dataset": (2, ["--model", "gnmt", "--dataset", "digits"], "trains on dataset 'pydocs'"),
    "mlp-max-tokens": (2, ["--max-tokens", "500"], "max-tokens"),  # mlp batches are fixed-size
    "pp-micro-batches": (4, ["--pp", "2", "--micro-batches", "5"], "divisible by 5 micro-batches"),
    "pp-layers": (4, ["--pp", "4", "--hidden", "64"], "2 layers cannot fill 4 pipeline stages"),
    "tp-hidden": (2, ["--tp", "2", "--hidden", "255,256"], "not divisible by the tensor-parallel size 2"),
    "schedule": (2, ["--pp", "2", "--schedule", "zigzag"], "schedule must be one of"),
    "interleaved": (2, ["--pp", "2", "--schedule", "interleaved", "--virtual-stages", "2", "--micro-batches", "3"],
                    "must be a multiple of 2"),
    "recompute": (2, ["--recompute", "full"], "use them with --pp > 1"),
    "gnmt-tp3": (3, ["--model", "gnmt", "--tp", "3"], "out_features 200 is not divisible by the tensor-parallel size 3"),
    "transformer-tp3": (3, ["--model", "transformer", "--tp", "3", "--hidden", "32,4,2"],
                        "heads 4 is not divisible by the tensor-parallel size 3"),
    "dlrm-sharding": (2, ["--model", "dlrm", "--sharding", "column"], "sharding must be one of"),
    "dlrm-tables": (2, ["--model", "dlrm", "--tables", "10,x"], "tables: expected rows per table"),
    "dlrm-lamb": (2, ["--model", "dlrm", "--optimizer", "lamb"], "lamb cannot apply row-sparse embedding"),
}


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    """Every REFUSED flag set through disttrain.job.main, one launch per rank count: name -> JobRun."""
    d = tmp_path_factory.mktemp("refused")
    (d / "c.toml").write_text('steps = 20\nbogus_key = 1\n')
    specs = {k: (n, [str(d / "c.toml") if f == "CFG" else f for f in flags]) for k, (n, flags, _) in REFUSED.items()}
    return run_main_jobs(specs, d, timeout=60, env=ENV)


def _refused_everywhere(job, n, msg):
    assert job.rcs == [2] * n and msg in job.logs[0], (job.rcs, job.out)
    assert job.logs[0].count("disttrain.train:") == 1 and "Traceback" not in job.logs[0], job.out
    assert not any(job.logs[1:]), job.out  # one message, from rank 0


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_flag_sets_end_every_rank_with_one_message(refused, name):
    n, _, msg = REFUSED[name]
    _refused_everywhere(refused[name], n, msg)


@pytest.mark.parametrize("n,flags,msg", [
    (3, ["--steps", "0"], "steps must be positive"),  # _agreed_config: the flags
    (3, ["--pp", "2"], "but the job has 3: launch 2 ranks"),  # _prepare: set-up (the mesh)
    (3, ["--resume", "--global-batch-size", "48", "--checkpoint-dir", "NONE"], "no valid checkpoint"),  # _prepare: resume
])
def test_each_way_of_refusing_ends_the_launched_job_on_every_rank(tmp_path, n, flags, msg):
    # (a global batch the 3 ranks do not divide is no longer an error: shares differ by one sample,
    # tests/mpi/test_uneven_batch.py and tests/test_elastic.py check the result against one process)
    res, took = train(n, *[str(tmp_path / "none") if f == "NONE" else f for f in flags], timeout=60)
    assert res.returncode == 2 and msg in res.stdout, (flags, res.stdout)
    assert res.stdout.count("disttrain.train:") == 1 and "Traceback" not in res.stdout, res.stdout
    assert took < 30


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


# The oracle runs: every mesh of the tests below against the same model in ONE process on the
# global batch (float64, rel 1e-9). They run through disttrain.job.main, every run of a rank count
# in one launch (tests/job_batch.py): 22 launches -> 4, the start-up each paid. Each run is the
# job's whole path from its flags to its metrics file; the first of each launch is a fresh
# process's, and a run that took state from an earlier one would leave its oracle's curve (fail).
HYBRID = ["--steps", "30", "--log-every", "10", "--dtype", "float64", "--hidden", "64,48,32"]
GNMT = ["--model", "gnmt", "--hidden", "6,8,1", "--vocab-size", "40", "--max-tokens", "0", "--global-batch-size",
        "10", "--micro-batches", "3", "--steps", "6", "--log-every", "2", "--dtype", "float64"]
DLRM_PP = ["--model", "dlrm", "--tables", "50,20,7", "--samples", "400", "--hidden", "4,8,8", "--global-batch-size",
           "24", "--steps", "6", "--log-every", "2", "--dtype", "float64"]
SHARDED = ["--steps", "20", "--log-every", "10", "--dtype", "float64", "--hidden", "40,24", "--optimizer",
           "adam", "--lr", "0.01", "--global-batch-size", "48"]
DLRM = ["--model", "dlrm", "--steps", "40", "--log-every", "10", "--dtype", "float64", "--samples", "12000",
        "--tables", "3000,500,40,7", "--global-batch-size", "96"]
TRANSFORMER = ["--model", "transformer", "--steps", "20", "--log-every", "10", "--dtype", "float64",
               "--hidden", "32,4,3", "--seq-len", "16"]
MESHES = {  # name: (ranks, flags); "*/one" is each group's oracle
    "hybrid/one": (1, HYBRID), "hybrid/dp2xpp2": (4, HYBRID + ["--dp", "2", "--pp", "2", "--micro-batches", "4"]),
    "hybrid/pp2xtp2": (4, HYBRID + ["--pp", "2", "--tp", "2", "--schedule", "gpipe", "--micro-batches", "8"]),
    "hybrid/tp2": (2, HYBRID + ["--tp", "2"]),
    "hybrid/interleaved": (2, HYBRID + ["--pp", "2", "--schedule", "interleaved", "--virtual-stages", "2",
                                        "--micro-batches", "4", "--recompute", "selective"]),
    "hybrid/zb1": (2, HYBRID + ["--pp", "2", "--schedule", "zb1", "--recompute", "full", "--micro-batches", "4"]),
    "gnmt/one": (1, GNMT), "gnmt/dp2xpp2": (4, GNMT + ["--pp", "2", "--schedule", "zb1", "--recompute", "full"]),
    "gnmt/pp2xtp2": (4, GNMT + ["--pp", "2", "--tp", "2"]),  # tp: the vocabulary-parallel output layer
    "dlrm-pp/one": (1, DLRM_PP), "dlrm-pp/pp2xtp2": (4, DLRM_PP + ["--pp", "2", "--tp", "2"]),  # pp3: test_reshard
    # gradients runs on a dp 2 x tp 2 mesh: the same global batch, so the same run as dp 3
    "sharded/none": (3, SHARDED), "sharded/optimizer": (3, SHARDED + ["--shard", "optimizer"]),
    "sharded/full": (3, SHARDED + ["--shard", "full"]),
    "sharded/tp-gradients": (4, SHARDED + ["--tp", "2", "--shard", "gradients"]),
    "dlrm/one": (1, DLRM), "dlrm/table3": (3, DLRM + ["--sharding", "table"]),
    "dlrm/row2": (2, DLRM + ["--sharding", "row"]),
    "transformer/one": (1, TRANSFORMER), "transformer/tp2": (2, TRANSFORMER + ["--tp", "2"]),
    "transformer/pp2xtp2": (4, TRANSFORMER + ["--pp", "2", "--tp", "2", "--schedule", "gpipe"]),
    "transformer/pp2zb1": (2, TRANSFORMER + ["--pp", "2", "--schedule", "zb1", "--recompute", "selective"]),
    "transformer/pp2zb2": (2, TRANSFORMER + ["--pp", "2", "--schedule", "zb2", "--micro-batches", "4"]),
}


@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
    """Every MESHES run: name -> (JobRun, its metrics records)."""
    d = tmp_path_factory.mktemp("meshes")
    metrics = {k: d / (k.replace("/", "-") + ".jsonl") for k in MESHES}
    jobs = run_main_jobs({k: (n, [*flags, "--metrics", metrics[k]]) for k, (n, flags) in MESHES.items()}, d,
                         timeout=120, env=ENV)
    for k, job in jobs.items():
        assert job.rcs == [0] * MESHES[k][0], (k, job.out)
    return {k: (job, [json.loads(ln) for ln in open(metrics[k])]) for k, job in jobs.items()}


def _group(meshes, group):
    return {k.split("/")[1]: v for k, v in meshes.items() if k.startswith(group + "/")}


def test_hybrid_meshes_reproduce_the_one_process_run(meshes):
    """--dp/--pp/--tp through the main job: the same losses and accuracy as one process on the
    global batch (float64, so only summation order differs)."""
    got = {}
    for name, (_, recs) in _group(meshes, "hybrid").items():
        got[name] = ([r["loss"] for r in recs if "loss" in r], recs[-1]["test_accuracy"])
        if "--pp" in MESHES["hybrid/" + name][1]:
            assert "pipeline_idle" in recs[0] and len(recs[0]["pipeline_peak_live"]) == MESHES["hybrid/" + name][0]
    want_losses, want_acc = got.pop("one")
    assert len(want_losses) == 3 and len(got) == 5, got
    for name, (ls, acc) in got.items():
        assert ls == pytest.approx(want_losses, rel=1e-9), name
        assert acc == want_acc, name


@pytest.mark.parametrize("model", ["gnmt", "dlrm-pp"])
def test_gnmt_and_dlrm_pipelines_reproduce_the_one_process_run(meshes, model):
    """--pp for gnmt (tuples of encoder states and lengths between stages, uneven micro-batches
    weighted by target tokens; --tp splits its output layer by vocabulary) and dlrm (embedding
    vectors carried past the bottom MLP; --tp splits its MLPs): the losses and test metrics of one
    process (float64)."""
    got = {name: ([r["loss"] for r in recs if "loss" in r], {k: v for k, v in recs[-1].items() if "test" in k})
           for name, (_, recs) in _group(meshes, model).items()}
    want = got.pop("one")
    assert len(want[0]) == 3 and want[1] and got, (want, got)
    for name, (ls, test) in got.items():
        assert ls == pytest.approx(want[0], rel=1e-9), (model, name)
        assert test == pytest.approx(want[1], rel=1e-9), (model, name)


def test_sharded_runs_reproduce_the_unsharded_run(meshes):
    """--shard optimizer|gradients|full (ZeRO-1/2/3) through the main job: the losses and accuracy of
    --shard none (float64; reduce-scatter + allgather instead of allreduce: summation order only),
    also on a dp 2 x tp 2 mesh (checkpoints of sharded runs: tests/test_reshard.py)."""
    got = {name: ([r["loss"] for r in recs if "loss" in r], recs[-1]["test_accuracy"])
           for name, (_, recs) in _group(meshes, "sharded").items()}
    want = got["none"]
    assert len(want[0]) == 2, want
    for name in ("optimizer", "full", "tp-gradients"):
        assert got[name][0] == pytest.approx(want[0], rel=1e-9), name
        assert got[name][1] == want[1], name


def test_dlrm_sharded_main_job_reproduces_one_process_and_learns(meshes):
    """--model dlrm: table- and row-wise sharded embeddings (AllToAll) + data-parallel MLPs give
    the one-process losses (float64), and the held-out log-loss beats the base rate."""
    got = {}
    for name, (job, recs) in _group(meshes, "dlrm").items():
        got[name] = [r["loss"] for r in recs if "loss" in r]
        if name != "one":
            assert recs[0]["embedding_alltoall_bytes"] > 0
        assert "sparse updates" in job.logs[0]  # the default: row-sparse gradients, lazy Adam
        final = recs[-1]
        assert final["test_logloss"] < final["base_rate_logloss"] - 0.02, final
    assert len(got["one"]) == 4, got
    for name in ("table3", "row2"):
        assert got[name] == pytest.approx(got["one"], rel=1e-9), name


def test_transformer_meshes_reproduce_the_one_process_run(meshes):
    """The tensor-parallel (heads split) and pipelined transformer LM through the main job gives
    the one-process losses and held-out metrics (float64)."""
    got = {name: ([r["loss"] for r in recs if "loss" in r], recs[-1]["test_loss"])
           for name, (_, recs) in _group(meshes, "transformer").items()}
    assert len(got["one"][0]) == 2, got
    for name in ("tp2", "pp2xtp2", "pp2zb1", "pp2zb2"):
        assert got[name][0] == pytest.approx(got["one"][0], rel=1e-9), name
        assert got[name][1] == pytest.approx(got["one"][1], rel=1e-9), name
