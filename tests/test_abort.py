"""An uncaught exception in one rank ends the whole job promptly with that rank's traceback."""
import os
import time

from ._mpirun import run

SCRIPT = """
import time, numpy as np, disttrain as dt
dt.init()
if dt.rank() == 1:
    time.sleep(0.5)
    raise ValueError("boom from rank one")
dt.allreduce(np.ones(4))   # the other ranks wait here for rank 1, which never comes
print("UNREACHABLE", flush=True)
"""


def test_exception_in_one_rank_aborts_all(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(SCRIPT)
    t = time.monotonic()
    res = run(3, [str(script)], timeout=60)
    took = time.monotonic() - t
    assert res.returncode not in (0, -9), res.stdout  # -9 would be our timeout: a hang
    assert took < 30, f"abort took {took:.0f} s"
    assert "rank 1: uncaught exception" in res.stdout and "ValueError: boom from rank one" in res.stdout
    assert "UNREACHABLE" not in res.stdout
    assert os.path.exists(script)
