"""Pipelines (uneven=True) whose replica batches are shorter than the micro-batch count - 0 rows
included, one dp replica empty while the other is not (a ragged epoch end under a token budget) -
join every step and reproduce ONE process trained on the global batch (float64)."""
import numpy as np
import pytest

from disttrain import nn
from disttrain.parallel.mesh import Mesh
from disttrain.parallel.pipeline import SCHEDULES
from disttrain.parallel.pipeline.schedules import problem

from .test_model_parallel import CLASSES, D, sgd, train_reference
from .test_pipeline_schedules import assert_matches, build


def mesh_shape(p):
    """(dp, pp): dp 2 where the world is even and > 2 (dp2 x pp2 at 4, dp2 x pp4 at 8), else pp = p."""
    return (2, p // 2) if p % 2 == 0 and p > 2 else (1, p)


def sizes(m, dp):
    """Rows per replica for each step: 0 .. m+1, repeated sizes (the known-shape path with empty
    micro-batches), replicas that differ (an empty global batch only with one replica)."""
    first = [1, 1, 0, 0, m + 1, max(m - 1, 2), 2]
    second = [m + 1, 0, 2, 1, 0, 1, 3]
    return [first, second][:dp]


def data(rows, seed):
    """Per step the replicas' batches (x, y) and the global one (their concatenation)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(len(rows[0])):
        parts = [(rng.standard_normal((r[k], D)), rng.integers(0, CLASSES, r[k])) for r in rows]
        out.append((parts, (np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts]))))
    return out


CASES = [(s, 2 if s == "interleaved" else 1) for s in SCHEDULES]


@pytest.mark.mpi
@pytest.mark.parametrize("schedule,v", CASES)
def test_short_batches_match_one_process(comm, schedule, v):
    """m = 1..4 (those the schedule accepts at this depth); each replica's loss weight is its
    share of the global rows (DataParallel averages), so the update is the global mean's."""
    dp, pp = mesh_shape(comm.Get_size())
    mesh, ran = Mesh(dp=dp, pp=pp), 0
    for m in range(1, 5):
        if problem(schedule, pp, m, v):
            continue
        steps = data(sizes(m, dp), seed=40 + m)
        pipe, stage, ref = build(mesh, schedule, m, v, uneven=True)
        want = train_reference(nn.Sequential(*ref), [g for _, g in steps])
        opt, got, known = sgd(stage.parameters()), [], []
        for parts, (_, y_all) in steps:
            x, y = parts[mesh.dp_rank]
            got.append(pipe.step(x if mesh.pp_is_first_stage else None, y if mesh.pp_is_last_stage else None,
                                 weight=len(y) * dp / max(1, len(y_all))))
            known.append(pipe.net.known)
            opt.step()
            opt.zero_grad()
        if dp == 1:  # the pipeline's loss is its replica's (weighted); with one replica the global one
            assert known[1] and known[3], known  # a repeated size with empty micro-batches: known shapes
        assert_matches(stage, ref, got, want, dp)
        ran += 1
    if not ran:
        pytest.skip(f"{schedule} accepts no m in 1..4 at pp {pp}")
