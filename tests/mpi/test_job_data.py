"""The main job's set-up agrees on data each host reads for itself (job/setup.py)."""
import numpy as np
import pytest

import disttrain as dt
from disttrain.data import text
from disttrain.job.config import parse_config
from disttrain.job.setup import setup


def corpus(extra: int) -> text.Seq2Seq:
    src = [np.array([4 + i % 5, 5, 6 + i % 3], np.int64) for i in range(40 + extra)]
    return text.Seq2Seq(src, [np.concatenate([s[::-1], [text.EOS]]) for s in src], text.SPECIALS + list("abcdefgh"))


@pytest.mark.mpi
@pytest.mark.parametrize("model", ["gnmt", "transformer"])
def test_a_host_with_another_pydocs_corpus_is_a_configuration_error_on_every_rank(model, monkeypatch):
    """The pydocs corpus comes from each host's own standard library: a host with another Python
    gave its ranks other sentences and another vocabulary, and the job trained on (silently)."""
    p, r = dt.size(), dt.rank()
    cfg = parse_config(["--model", model, "--hidden", "8,8,1" if model == "gnmt" else "8,2,1", "--seq-len", "4",
                        "--global-batch-size", "4", "--steps", "1"])
    made, mesh = [], dt.Mesh
    monkeypatch.setattr(dt, "Mesh", lambda *a, **k: made.append(mesh(*a, **k)) or made[-1])  # freed below
    try:
        monkeypatch.setattr(text, "load_reverse_corpus", lambda **kw: corpus(0))
        setup(cfg)  # the same corpus everywhere: agreed
        monkeypatch.setattr(text, "load_reverse_corpus", lambda **kw: corpus(int(r == p - 1 and p > 1)))
        if p == 1:
            setup(cfg)
            return
        with pytest.raises(ValueError, match=rf"rank\(s\) \[{p - 1}\] built other training data than rank 0"):
            setup(cfg)
    finally:
        for m in made:
            m.free()
