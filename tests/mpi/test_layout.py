"""Parameter layouts: every rank's pieces, assembled by global name, are exactly the one-process
model's arrays (tensor-parallel blocks, sharded embedding rows, table- and row-wise)."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import nn
from disttrain.nn.layout import shards
from disttrain.parallel.embedding import LocalEmbeddings, ShardedEmbeddings
from disttrain.parallel.tensor import ParallelMLP

SIZES = (13, 5, 2, 9)


def assemble(params) -> dict:
    """{global name: array} from every rank's shards of `params` (the test's own gather)."""
    mine = [(s.name, s.shape, s.box, s.flat, s.data.copy()) for p in params for s in shards(p)]
    out, seen = {}, {}
    for name, shape, box, flat, data in (x for part in dt.world().comm.allgather(mine) for x in part):
        a = out.setdefault(name, np.full(shape, np.nan))
        seen.setdefault(name, np.zeros(shape, bool))
        idx = tuple(slice(s, e) for s, e in box)
        assert flat is None
        a[idx] = data
        seen[name][idx] = True
    for name, m in seen.items():
        assert m.all(), f"{name}: not every element is held by some rank"
    return out


@pytest.mark.parametrize("sharding", ["table", "row"])
def test_sharded_embedding_pieces_are_the_tables(sharding):
    emb = ShardedEmbeddings(SIZES, 3, sharding=sharding, rng=np.random.default_rng(4), dtype=np.float64)
    ref = LocalEmbeddings(SIZES, 3, rng=np.random.default_rng(4), dtype=np.float64)
    holder, refholder = nn.Sequential(emb), nn.Sequential(ref)
    got = assemble(holder.parameters())
    want = {p.name: p.data for p in refholder.parameters()}
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_tensor_parallel_pieces_are_the_dense_weights():
    tp = ParallelMLP(6, 4 * dt.size(), rng=np.random.default_rng(2), dtype=np.float64)
    rng = np.random.default_rng(2)
    ref = nn.Sequential(nn.Linear(6, 4 * dt.size(), rng=rng, dtype=np.float64), nn.GELU(),
                        nn.Linear(4 * dt.size(), 6, init="xavier", rng=rng, dtype=np.float64))
    got = assemble(tp.parameters())
    want = {p.name: p.data for p in ref.parameters()}  # the dense block's own names (layers.0/2): a
    # checkpoint written at --tp 2 resumes at --tp 1 (attack7)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
