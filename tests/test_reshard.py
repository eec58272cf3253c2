"""Resharding resumes of the main job (issue 15 part 2), against the oracle of the same run in ONE
process on the global batch (float64, relative 1e-9): checkpoints written at 4 ranks under
dp4, dp2 x tp2, dp2 x pp2, pp2 x tp2 and shard=full resume at 2 and at 3 ranks under another layout; DLRM
resumes table-wise <-> row-wise at another rank count; a rank killed between its shard write and
the manifest leaves the previous checkpoint to resume from; compressor residuals that do not fit
are dropped with a warning."""
import json
import shutil

import numpy as np
import pytest

from ._mpirun import run

ENV = {"DISTTRAIN_COSTMODEL": "defaults"}
# stop at 5, inside the logging interval 4..6: the partial interval is carried across layouts too
MLP = ["--steps", "9", "--log-every", "3", "--global-batch-size", "24", "--hidden", "24,24", "--dtype", "float64",
       "--warmup-steps", "3", "--micro-batches", "2"]
DLRM = ["--model", "dlrm", "--steps", "8", "--log-every", "2", "--global-batch-size", "24", "--tables", "50,20,7,3",
        "--samples", "600", "--hidden", "4,8,8", "--dtype", "float64", "--warmup-steps", "2"]
RTOL = 1e-9


def _train(n, *flags, env=None):
    res = run(n, ["-m", "disttrain.train", *flags], timeout=120, env={**ENV, **(env or {})})
    assert res.returncode == 0, res.stdout[-3000:]
    return res


def _losses(path):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(path).read().splitlines()) if "loss" in r]


def _same_curve(got, want):
    assert [s for s, _ in got] == [s for s, _ in want], (got, want)
    np.testing.assert_allclose([x for _, x in got], [x for _, x in want], rtol=RTOL, atol=0)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    d = tmp_path_factory.mktemp("oracle")
    _train(1, *MLP, "--metrics", str(d / "mlp.jsonl"))
    return _losses(d / "mlp.jsonl")


# source layout at 4 ranks -> (layout at 2 ranks, layout at 3 ranks), each different from the source
MATRIX = {"dp4": ([], ["--pp", "2"], ["--tp", "3"]),
          "dp2xtp2": (["--tp", "2"], ["--dp", "2"], ["--dp", "3"]),
          "dp2xpp2": (["--pp", "2"], ["--tp", "2"], ["--pp", "3"]),
          "pp2xtp2": (["--pp", "2", "--tp", "2"], ["--dp", "2"], ["--tp", "3"]),
          # ZeRO-3 shards (flat ranges of every parameter and of its optimizer state) -> ZeRO-1 / ZeRO-2
          "shard=full": (["--shard", "full"], ["--shard", "optimizer"], ["--shard", "gradients"])}


@pytest.mark.parametrize("source", list(MATRIX))
def test_checkpoint_of_4_ranks_resumes_at_2_and_3_under_another_layout(tmp_path, oracle, source):
    write, at2, at3 = MATRIX[source]
    ck, m = tmp_path / "ck", tmp_path / "m.jsonl"
    res = _train(4, *MLP, *write, "--checkpoint-dir", str(ck), "--stop-after-steps", "5", "--metrics", str(m))
    assert "stopped after step 5" in res.stdout, res.stdout
    _resume_each(tmp_path, ck, m, MLP, ((2, at2), (3, at3)), oracle)


def _resume_each(tmp_path, ck, m, flags, layouts, want):
    """Resume copies of checkpoint directory `ck` (and metrics `m`) at each (ranks, layout flags):
    each continues the curve `want` from step 5."""
    for n, layout in layouts:
        ck2, m2 = tmp_path / f"ck{n}", tmp_path / f"m{n}.jsonl"
        shutil.copytree(ck, ck2)
        shutil.copy(m, m2)
        res = _train(n, *flags, *layout, "--checkpoint-dir", str(ck2), "--resume", "--metrics", str(m2))
        assert "step-00000005 at step 5" in res.stdout, res.stdout
        _same_curve(_losses(m2), want)


def test_dlrm_resumes_table_wise_from_row_wise_and_back(tmp_path):
    _train(1, *DLRM, "--metrics", str(tmp_path / "ref.jsonl"))
    want = _losses(tmp_path / "ref.jsonl")
    for (n0, s0), (n1, s1) in (((3, "table"), (2, "row")), ((2, "row"), (3, "table"))):
        ck, m = tmp_path / f"ck-{s0}", tmp_path / f"{s0}.jsonl"
        _train(n0, *DLRM, "--sharding", s0, "--checkpoint-dir", str(ck), "--stop-after-steps", "5", "--metrics", str(m))
        res = _train(n1, *DLRM, "--sharding", s1, "--checkpoint-dir", str(ck), "--resume", "--metrics", str(m))
        assert "resumed from" in res.stdout, res.stdout
        _same_curve(_losses(m), want)


def test_dlrm_pipeline_checkpoint_resumes_under_another_mesh(tmp_path):
    """A DLRM checkpoint of pipeline stages with tensor-parallel MLPs (pp2 x tp2 at 4 ranks) resumes
    as a 3-stage pipeline and as plain data parallelism with row-sharded tables."""
    _train(1, *DLRM, "--metrics", str(tmp_path / "ref.jsonl"))
    want = _losses(tmp_path / "ref.jsonl")
    ck, m = tmp_path / "ck", tmp_path / "m.jsonl"
    _train(4, *DLRM, "--pp", "2", "--tp", "2", "--checkpoint-dir", str(ck), "--stop-after-steps", "5", "--metrics", str(m))
    _resume_each(tmp_path, ck, m, DLRM, ((3, ["--pp", "3"]), (2, ["--sharding", "row"])), want)


def test_rank_killed_between_its_shards_and_the_manifest_leaves_the_previous_checkpoint(tmp_path, oracle):
    ck, m = tmp_path / "ck", tmp_path / "m.jsonl"
    kill = {"DISTTRAIN_FAULT_INJECT": "checkpoint-shards", "DISTTRAIN_FAULT_AT": "2", "DISTTRAIN_FAULT_RANK": "1"}
    dead = run(3, ["-m", "disttrain.train", *MLP, "--tp", "3", "--checkpoint-every", "3", "--checkpoint-dir", str(ck),
                   "--metrics", str(m)], timeout=120, env={**ENV, **kill})
    assert dead.returncode not in (0, -9), dead.stdout  # ended by the abort, not by the test's timeout
    names = sorted(p.name for p in ck.iterdir())
    assert "step-00000003" in names and "step-00000006" not in names, names
    assert any(".tmp-" in n for n in names), names  # the unfinished directory, without a manifest
    res = _train(2, *MLP, "--checkpoint-dir", str(ck), "--resume", "--metrics", str(m))
    assert "step-00000003 at step 3" in res.stdout, res.stdout
    _same_curve(_losses(m), oracle)
    assert not any(".tmp-" in p.name for p in ck.iterdir()), "the dead writer's directory was not cleaned up"


def test_compressor_residuals_on_another_world_size_are_dropped_with_a_warning(tmp_path):
    ck = tmp_path / "ck"
    _train(2, *MLP, "--compression", "topk:0.1", "--checkpoint-dir", str(ck), "--stop-after-steps", "5")
    res = _train(3, *MLP, "--compression", "topk:0.1", "--checkpoint-dir", str(ck), "--resume")
    assert "error-feedback residuals start from zero" in res.stdout and "resumed from" in res.stdout, res.stdout
    assert res.stdout.count("residuals start from zero") == 1, res.stdout  # said once, by rank 0
