"""The main job's set-up agrees on data each host reads for itself (job/setup.py)."""
import numpy as np
import pytest

import disttrain as dt
from disttrain.data import text
from disttrain.job.config import parse_config
from disttrain.job.setup import setup


def corpus(extra: int, long: int = 0) -> text.Seq2Seq:
    src = [np.array([4 + i % 5, 5, 6 + i % 3], np.int64) for i in range(40 + extra)]
    src += [np.arange(long, dtype=np.int64) % 8 + 4] if long else []
    return text.Seq2Seq(src, [np.concatenate([s[::-1], [text.EOS]]) for s in src], text.SPECIALS + list("abcdefgh"))


@pytest.fixture
def freed_meshes(monkeypatch):
    """The meshes set-up creates, freed after the test (a test that raises out of setup leaves
    them otherwise; MPICH's communicator limit is shared by the whole suite run)."""
    made, mesh = [], dt.Mesh
    monkeypatch.setattr(dt, "Mesh", lambda *a, **k: made.append(mesh(*a, **k)) or made[-1])
    yield made
    for m in made:
        m.free()


@pytest.mark.mpi
@pytest.mark.parametrize("model", ["gnmt", "transformer"])
def test_a_host_with_another_pydocs_corpus_is_a_configuration_error_on_every_rank(model, monkeypatch, freed_meshes):
    """The pydocs corpus comes from each host's own standard library: a host with another Python
    gave its ranks other sentences and another vocabulary, and the job trained on (silently)."""
    p, r = dt.size(), dt.rank()
    cfg = parse_config(["--model", model, "--hidden", "8,8,1" if model == "gnmt" else "8,2,1", "--seq-len", "4",
                        "--global-batch-size", "4", "--steps", "1"])
    monkeypatch.setattr(text, "load_reverse_corpus", lambda **kw: corpus(0))
    setup(cfg)  # the same corpus everywhere: agreed
    monkeypatch.setattr(text, "load_reverse_corpus", lambda **kw: corpus(int(r == p - 1 and p > 1)))
    if p == 1:
        setup(cfg)
        return
    with pytest.raises(ValueError, match=rf"rank\(s\) \[{p - 1}\] built other training data than rank 0"):
        setup(cfg)


@pytest.mark.mpi
def test_a_set_up_that_fails_on_one_rank_only_fails_on_every_rank(monkeypatch, freed_meshes):
    """attack5: the workload reads each host's data, so building it can fail on one rank only
    (here the last rank's corpus holds a sentence longer than --max-tokens: the batcher refuses
    it). That rank returned exit status 2 alone - silently unless it was rank 0 - and its peers
    waited for it in the data agreement forever. Now the same ValueError everywhere, naming it."""
    p, r = dt.size(), dt.rank()
    cfg = parse_config(["--model", "gnmt", "--hidden", "8,8,1", "--max-tokens", "40", "--steps", "1"])
    monkeypatch.setattr(text, "load_reverse_corpus", lambda **kw: corpus(0, long=60 if r == p - 1 else 0))
    with pytest.raises(ValueError, match="max_tokens 40 is smaller than the longest sample") as e:
        setup(cfg)
    assert (f"on rank(s) [{p - 1}] only" in str(e.value)) == (p > 1), str(e.value)
    monkeypatch.setattr(text, "load_reverse_corpus", lambda **kw: corpus(0, long=60))  # every rank: as it was
    with pytest.raises(ValueError, match=r"longest sample \(61 tokens, sample \d+\)$"):
        setup(cfg)


@pytest.mark.mpi
@pytest.mark.parametrize("model", ["gnmt", "transformer"])
def test_a_set_up_that_fails_on_one_rank_only_fails_on_every_rank_under_tensor_parallelism(model, monkeypatch, freed_meshes):
    """review6: with --tp > 1 a workload's model is built collectively (every tensor-parallel layer
    checks its split with its tp group) right after its data. A rank whose own data made the
    set-up fail (gnmt: a sentence over --max-tokens; transformer: no held-out window) waited in
    the data agreement while its tp peers waited in their first layer's check for it: a hang
    (stall reports only, no shutdown by default). Now the agreement comes before the model."""
    p, r = dt.size(), dt.rank()
    tp = next((t for t in (4, 3, 2) if p % t == 0), 0)  # the corpus's 12 tokens split over tp
    if not tp:
        pytest.skip("needs a world that 2, 3 or 4 tensor-parallel ranks divide")
    if model == "gnmt":
        cfg = parse_config(["--model", "gnmt", "--hidden", "8,8,1", "--max-tokens", "40", "--steps", "1", "--tp", str(tp)])
        bad, match = corpus(0, long=60), "max_tokens 40 is smaller than the longest sample"
    else:
        cfg = parse_config(["--model", "transformer", "--hidden", "12,12,1", "--seq-len", "4", "--global-batch-size", "4",
                            "--steps", "1", "--tp", str(tp)])
        bad, match = corpus(-20), "seq-len 4 leaves no held-out window"
    monkeypatch.setattr(text, "load_reverse_corpus", lambda **kw: bad if r == p - 1 else corpus(0))
    with pytest.raises(ValueError, match=match) as e:
        setup(cfg)
    assert f"on rank(s) [{p - 1}] only" in str(e.value), str(e.value)
