"""The main job's communication metrics never contradict themselves: per logged interval
0 <= exposed_comm_s <= comm_s, in the metrics file and in the progress line (issue 14, item 16)."""
import json
import re

from disttrain.job import comm_summary, comm_fields

from ._mpirun import run


def test_comm_fields_keep_consistent_counters_and_refuse_contradicting_ones():
    assert comm_fields(0.4, 0.1, 10) == {"comm_s": 0.04, "exposed_comm_s": 0.01}
    assert comm_fields(0.0, 0.0, 5) == {"comm_s": 0.0, "exposed_comm_s": 0.0}
    bad = comm_fields(0.31, 0.37, 1)  # the contradiction from the issue
    assert bad["comm_s"] is None and bad["exposed_comm_s"] is None and bad["comm_accounting"] == "inconsistent"
    assert (bad["comm_raw_s"], bad["exposed_comm_raw_s"]) == (0.31, 0.37)
    assert comm_summary(dict(bad, step_time_s=1.0)) == "comm n/a (inconsistent counters)"
    assert comm_summary(dict(comm_fields(0.31, 0.30, 1), step_time_s=1.0)) == "comm  31% of step, exposed  30%"


def test_progress_lines_and_records_never_show_exposed_above_comm(tmp_path):
    m = tmp_path / "m.jsonl"
    res = run(2, ["-m", "disttrain.train", "--steps", "40", "--log-every", "10", "--hidden", "256,256",
                  "--bucket-mb", "0.1", "--metrics", str(m)], timeout=60, env={"DISTTRAIN_COSTMODEL": "defaults"})
    assert res.returncode == 0, res.stdout
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("step ")]
    assert len(lines) == 4, res.stdout
    for ln in lines:
        got = re.search(r"comm +(\d+)% of step, exposed +(\d+)%", ln)
        assert got or "comm n/a (inconsistent counters)" in ln, ln
        if got:
            assert int(got[2]) <= int(got[1]), ln
    for r in (json.loads(x) for x in open(m)):
        if "loss" not in r:
            continue
        if r["comm_s"] is None:
            assert r["comm_accounting"] == "inconsistent" and r["exposed_comm_raw_s"] > r["comm_raw_s"], r
        else:
            assert 0 <= r["exposed_comm_s"] <= r["comm_s"], r
        assert r["compute_s"] <= r["step_time_s"]


def test_union_and_overlap_of_communication_intervals():
    from disttrain.parallel.data import _union_and_overlap

    assert _union_and_overlap([(0, 2), (1, 3), (5, 6)], 2.5, 5.5) == (4.0, 1.0)
    assert _union_and_overlap([], 0, 1) == (0.0, 0.0)
    assert _union_and_overlap([(0, 1), (0, 1)], -1, 2) == (1.0, 1.0)  # duplicates count once
    total, inside = _union_and_overlap([(0, 4), (1, 2), (3, 9)], 5, 20)
    assert (total, inside) == (9.0, 4.0)
