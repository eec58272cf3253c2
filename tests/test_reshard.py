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

from ._mpirun import run, run_main_jobs

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
def oracle(resharded):
    return _losses(resharded["dir"] / "mlp.jsonl")


# source layout at 4 ranks -> (layout at 2 ranks, layout at 3 ranks), each different from the source
MATRIX = {"dp4": ([], ["--pp", "2"], ["--tp", "3"]),
          "dp2xtp2": (["--tp", "2"], ["--dp", "2"], ["--dp", "3"]),
          "dp2xpp2": (["--pp", "2"], ["--tp", "2"], ["--pp", "3"]),
          "pp2xtp2": (["--pp", "2", "--tp", "2"], ["--dp", "2"], ["--tp", "3"]),
          # ZeRO-3 shards (flat ranges of every parameter and of its optimizer state) -> ZeRO-1 / ZeRO-2
          "shard=full": (["--shard", "full"], ["--shard", "optimizer"], ["--shard", "gradients"])}
# DLRM: table-wise at 3 <-> row-wise at 2; pp2 x tp2 at 4 -> pp3 at 3 and row-sharded dp2 at 2
DLRM_WRITES = {"table3": (3, ["--sharding", "table"]), "row2": (2, ["--sharding", "row"]),
               "pp2xtp2": (4, ["--pp", "2", "--tp", "2"])}
DLRM_RESUMES = {"table3": [(2, ["--sharding", "row"])], "row2": [(3, ["--sharding", "table"])],
                "pp2xtp2": [(3, ["--pp", "3"]), (2, ["--sharding", "row"])]}


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    """Every run of this file but the killed writer's, through disttrain.job.main in two phases of
    one launch per rank count (tests/job_batch.py): the oracles and every checkpoint stopped at
    step 5, then every resume from a copy of its checkpoint - 27 launches -> 6, ~30 s of start-up.
    A resume never shares a process with the run that wrote its checkpoint (the phases are
    separate launches); the resumes before it in its launch ended at the last step, so one that
    took anything from memory instead of its checkpoint would leave the curve (fail)."""
    d = tmp_path_factory.mktemp("reshard")
    stop = ["--stop-after-steps", "5"]
    writes = {"oracle/mlp": (1, [*MLP, "--metrics", d / "mlp.jsonl"]),
              "oracle/dlrm": (1, [*DLRM, "--metrics", d / "dlrm.jsonl"]),
              "residuals": (2, [*MLP, "--compression", "topk:0.1", "--checkpoint-dir", d / "ck-residuals", *stop])}
    writes.update((f"mlp/{src}", (4, [*MLP, *MATRIX[src][0], "--checkpoint-dir", d / f"ck-mlp-{src}", *stop,
                                      "--metrics", d / f"mlp-{src}.jsonl"])) for src in MATRIX)
    writes.update((f"dlrm/{src}", (n, [*DLRM, *flags, "--checkpoint-dir", d / f"ck-dlrm-{src}", *stop,
                                       "--metrics", d / f"dlrm-{src}.jsonl"])) for src, (n, flags) in DLRM_WRITES.items())
    jobs = run_main_jobs(writes, d, timeout=120, env=ENV)
    resumes = {"residuals": (3, [*MLP, "--compression", "topk:0.1", "--checkpoint-dir", d / "ck-residuals",
                                 "--resume"])}
    for model, flags, layouts in [("mlp", MLP, {s: ((2, m[1]), (3, m[2])) for s, m in MATRIX.items()}),
                                  ("dlrm", DLRM, DLRM_RESUMES)]:
        for src, targets in layouts.items():
            for n, layout in targets:
                ck, m = d / f"ck-{model}-{src}-at{n}", d / f"{model}-{src}-at{n}.jsonl"
                shutil.copytree(d / f"ck-{model}-{src}", ck)
                shutil.copy(d / f"{model}-{src}.jsonl", m)
                resumes[f"{model}/{src}/at{n}"] = (n, [*flags, *layout, "--checkpoint-dir", ck, "--resume", "--metrics", m])
    jobs.update(run_main_jobs(resumes, d, timeout=120, env=ENV))
    for k, job in jobs.items():
        assert job.rcs == [0] * len(job.rcs), (k, job.out[-3000:])
    return dict(jobs, dir=d)


@pytest.mark.parametrize("source", list(MATRIX))
def test_checkpoint_of_4_ranks_resumes_at_2_and_3_under_another_layout(resharded, oracle, source):
    assert "stopped after step 5" in resharded[f"mlp/{source}"].logs[0]
    _resumed_each(resharded, "mlp", source, (2, 3), oracle)


def _resumed_each(resharded, model, source, ranks, want):
    """Each resume of `source`'s checkpoint continued the curve `want` from step 5."""
    for n in ranks:
        assert "step-00000005 at step 5" in resharded[f"{model}/{source}/at{n}"].logs[0], (source, n)
        _same_curve(_losses(resharded["dir"] / f"{model}-{source}-at{n}.jsonl"), want)


def test_dlrm_resumes_table_wise_from_row_wise_and_back(resharded):
    want = _losses(resharded["dir"] / "dlrm.jsonl")
    assert len(want) == 4, want
    _resumed_each(resharded, "dlrm", "table3", (2,), want)
    _resumed_each(resharded, "dlrm", "row2", (3,), want)


def test_dlrm_pipeline_checkpoint_resumes_under_another_mesh(resharded):
    """A DLRM checkpoint of pipeline stages with tensor-parallel MLPs (pp2 x tp2 at 4 ranks) resumes
    as a 3-stage pipeline and as plain data parallelism with row-sharded tables."""
    _resumed_each(resharded, "dlrm", "pp2xtp2", (3, 2), _losses(resharded["dir"] / "dlrm.jsonl"))


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


def test_compressor_residuals_on_another_world_size_are_dropped_with_a_warning(resharded):
    res = resharded["residuals"]
    assert "error-feedback residuals start from zero" in res.logs[0] and "resumed from" in res.logs[0], res.out
    assert res.out.count("residuals start from zero") == 1, res.out  # said once, by rank 0
