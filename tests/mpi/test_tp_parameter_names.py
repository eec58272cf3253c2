"""attack7: a tensor-parallel model's parameters carry the dense model's names.

Checkpoints are keyed by parameter name and reshard to any layout of the same model. The
transformer's tensor-parallel MLP (ParallelMLP) named its layers `up` / `down` where the dense
block's Sequential has `layers.0` / `layers.2`: a checkpoint written at --tp 2 was refused at
--tp 1 ("holds a different model") and the other way round (tests/fuzz_job.py --kind resume).
"""
import pytest

import disttrain as dt
from disttrain.parallel.mesh import Mesh
from disttrain_zoo.mlp import MLP
from disttrain_zoo.transformer import Transformer


@pytest.mark.mpi
def test_tensor_parallel_models_name_their_parameters_like_the_dense_ones(comm):
    mesh = Mesh(tp=dt.size())
    for make in (lambda g: Transformer(30, d=8 * dt.size(), heads=2 * dt.size(), layers=2, ffn=8 * dt.size(), group=g),
                 lambda g: MLP([6, 20 * dt.size(), 10 * dt.size(), 4], tp_group=g)):
        dense = [p.name for p in make(None).parameters()]
        split = [p.name for p in make(mesh.tp_group).parameters()]
        assert split == dense
    mesh.free()
