"""DistributedSampler, the embedded data set and checkpoints (one process)."""
import os

import numpy as np
import pytest

from disttrain.checkpoint import single
from disttrain.data import DistributedSampler, load_digits


@pytest.mark.parametrize("n,B,P", [(100, 12, 3), (97, 10, 5), (64, 64, 8), (10, 4, 1)])
@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_sampler_shards_are_disjoint_and_cover_the_global_batch(n, B, P, remainder):
    samplers = [DistributedSampler(n, B, r, P, seed=3, remainder=remainder) for r in range(P)]
    spe = samplers[0].steps_per_epoch
    assert spe == n // B + (1 if n % B and remainder == "pad" else 0)
    for epoch in range(2):
        seen = []
        for s in range(epoch * spe, (epoch + 1) * spe):
            shards = [smp.indices(s) for smp in samplers]
            g = np.concatenate(shards)
            assert all(len(sh) == B // P for sh in shards) and np.array_equal(g, samplers[0].global_batch(s))
            if remainder == "drop" or s % spe < spe - 1:
                assert len(set(g.tolist())) == B  # disjoint
            seen.extend(g.tolist())
        counts = np.bincount(seen, minlength=n)
        if remainder == "drop":
            assert counts.max() == 1 and counts.sum() == spe * B  # each sample at most once, N mod B dropped
        else:
            assert counts.min() >= 1  # every sample at least once per epoch
    assert not np.array_equal(samplers[0].global_batch(0), samplers[0].global_batch(spe)) or n == B


@pytest.mark.parametrize("B,P", [(16, 3), (7, 5), (3, 5), (10, 4), (12, 3)])
def test_uneven_sampler_shares_the_same_global_batch_at_any_world(B, P):
    """uneven=True: the P shares are array_split blocks of the one global batch that every world
    size trains on (an elastic restart on fewer ranks continues the same run)."""
    one = DistributedSampler(100, B, 0, 1, seed=5, uneven=True)
    samplers = [DistributedSampler(100, B, r, P, seed=5, uneven=True) for r in range(P)]
    for s in (0, 3, one.steps_per_epoch + 1):
        shards = [smp.indices(s) for smp in samplers]
        assert [len(x) for x in shards] == [len(x) for x in np.array_split(np.arange(B), P)]
        assert np.array_equal(np.concatenate(shards), one.indices(s))


def test_sampler_rejects_bad_batches():
    with pytest.raises(ValueError, match="divisible"):
        DistributedSampler(100, 10, 0, 3)
    with pytest.raises(ValueError, match="exceeds"):
        DistributedSampler(10, 20, 0, 2)


def test_digits_dataset():
    d = load_digits()
    assert d.x_train.shape == (1438, 64) and d.x_test.shape == (359, 64) and d.num_classes == 10
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0 and set(np.unique(d.y_train)) == set(range(10))
    assert np.array_equal(d.y_test, load_digits().y_test)  # deterministic split


def test_checkpoint_round_trip_atomic_and_checksummed(tmp_path):
    arrays = {"param/layers.0.weight": np.arange(6.0).reshape(2, 3), "opt/w/momentum": np.ones(3, np.float32)}
    path = str(tmp_path / "one.npz")  # the consolidated single-file format (convert --to single)
    single.save(path, arrays, {"step": 7})
    got, meta = single.load(path)
    assert meta == {"step": 7} and set(got) == set(arrays)
    assert all(np.array_equal(got[k], v) and got[k].dtype == v.dtype for k, v in arrays.items())
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary left behind
    good = open(path, "rb").read()
    refused = 0
    for pos in range(len(good)):  # flip each byte: refused, or (zip timestamps, header padding) harmless
        raw = bytearray(good)
        raw[pos] ^= 0xFF
        open(path, "wb").write(bytes(raw))
        try:
            again, meta2 = single.load(path)
        except ValueError as e:
            assert "corrupt" in str(e) or "checksum" in str(e)
            refused += 1
            continue
        assert meta2 == meta and set(again) == set(arrays), pos  # never silently different data
        assert all(np.array_equal(again[k], v) and again[k].dtype == v.dtype for k, v in arrays.items()), pos
    assert refused > 0.5 * len(good)  # measured: 751 of 959 positions; the rest are zip/npy header bytes
    open(path, "wb").write(good[: len(good) // 2])  # a torn (truncated) file
    with pytest.raises(ValueError, match="corrupt"):
        single.load(path)
