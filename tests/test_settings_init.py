"""dt.set_validation before dt.init() (call8): the ranks' values are compared by dt.init(), which
raises on every rank if they differ (before: rank 0's environment value silently replaced every
rank's choice), and a value set from code wins over DISTTRAIN_VALIDATE. Bounded in time: a
regression to a hang fails on the timeout."""
from ._mpirun import run

ENV = {"DISTTRAIN_COSTMODEL": "defaults", "DISTTRAIN_VALIDATE": "1"}
SCRIPT = """
import numpy as np, disttrain as dt
from disttrain.comm import config
{before}
try:
    dt.init()
except dt.CollectiveError as e:
    print(f"rank-err: {{e}}", flush=True)
    raise SystemExit(0)
print(f"rank-ok validate={{config.settings.validate}} sum={{dt.allreduce(np.ones(3))[0]}}", flush=True)
"""


def _run(tmp_path, n, before):
    p = tmp_path / "s.py"
    p.write_text(SCRIPT.format(before=before))
    res = run(n, [str(p)], timeout=60, env=ENV)
    assert res.returncode == 0, res.stdout
    return res.stdout


def test_different_values_before_init_raise_on_every_rank(tmp_path):
    for n, before in ((2, "if dt.rank() == 1: dt.set_validation(False)"),
                      (3, "dt.set_validation(dt.rank() != 2)")):
        out = _run(tmp_path, n, before.replace("dt.rank()", "int(__import__('os').environ['PMI_RANK'])"))
        # counted, not split into lines: the ranks' lines may interleave
        assert out.count("rank-err: set_validation() before dt.init() differs") == n, out
        assert out.count("rank-") == n, out


def test_the_same_value_before_init_wins_over_the_environment(tmp_path):
    out = _run(tmp_path, 3, "dt.set_validation(False)")
    assert out.count("rank-ok validate=False sum=3.0") == 3 and out.count("rank-") == 3, out
