"""DLRM-style recommender (Naumov et al. 2019, "Deep Learning Recommendation Model for
Personalization and Recommendation Systems").

    dense features -> bottom MLP (ReLU) -> b (B, dim)
    one id per categorical feature -> embedding tables -> e (B, T, dim)
    dot interaction: pairwise dot products of the T + 1 vectors [b, e_1..e_T] (upper triangle),
        concatenated with b
    -> top MLP -> one click logit (BCEWithLogits)

With ``sharding=None`` the tables are ordinary local ones (``LocalEmbeddings``: the one-process
model). With ``sharding="table" | "row"`` they are ``ShardedEmbeddings`` over `group`, looked up
with AllToAll, while the MLPs stay replicated for DataParallel over the same group - DLRM's
hybrid parallelism. The same seed gives the same model either way (the tables are drawn by
counter-based generators keyed by (seed, table, row block): no rank ever draws a whole table).

``sparse=True`` gives the tables row-sparse gradients: the optimizer (SGD, lazy Adam) then updates
only the rows a step looked up instead of sweeping every row (parallel/embedding.py). It is off by
default here (the model's numbers do not change silently); the main job turns it on for dlrm
(``--sparse-embeddings``, default on).

forward((dense, ids)) -> logits (B, 1); backward(dlogits) -> None, reporting the top MLP's and
then the bottom MLP's gradients ready (DataParallel starts their allreduce while the embedding
gradients are still travelling through the AllToAll). The model is a Sequential of pipeline units
taking and returning tuples (parallel/pipeline/activations.py): (dense, ids) -> lookup -> (dense,
e) -> bottom MLP blocks on dense, e carried -> (b, e) -> interaction -> top MLP blocks -> logits.
"""
from __future__ import annotations

import numpy as np

from disttrain import nn
from disttrain.parallel.embedding import LocalEmbeddings, ShardedEmbeddings
from disttrain.parallel.pipeline.activations import Carry

from .mlp import MLP


class DotInteraction(nn.Module):
    """(b (B, d), e (B, T, d)) -> [b, <z_i, z_j> for i < j] with z = [b, e_1, ..., e_T]."""

    def forward(self, x):
        b, e = x
        z = np.concatenate([b[:, None, :], e], axis=1)  # (B, F, d)
        f = z.shape[1]
        self._iu = np.triu_indices(f, 1)
        self._z = z
        m = z @ z.transpose(0, 2, 1)
        return np.concatenate([b, m[:, self._iu[0], self._iu[1]]], axis=1)

    def backward(self, dy):
        z, (i, j) = self._z, self._iu
        d = z.shape[2]
        dm = np.zeros((z.shape[0], z.shape[1], z.shape[1]), dy.dtype)
        dm[:, i, j] = dy[:, d:]
        dz = (dm + dm.transpose(0, 2, 1)) @ z
        return dy[:, :d] + dz[:, 0], dz[:, 1:]


class EmbeddingLookup(nn.Module):
    """(dense, ids) -> (dense, e): the tables' vectors e (B, T, dim) next to the dense features."""

    def __init__(self, embeddings):
        self.embeddings = embeddings

    def forward(self, x):
        dense, ids = x
        return dense, self.embeddings.forward(ids)

    def backward(self, d):
        self.embeddings.backward(d[1])
        return None  # the data has no gradient


class DLRM(nn.Sequential):
    """Args: table sizes, embedding dim, dense feature count, bottom / top hidden sizes,
    sharding (None | "table" | "row"), group (for sharding), seed, dtype, alltoall algorithm,
    sparse (row-sparse embedding gradients: updates of the touched rows only), tp_group (the MLPs'
    Linear layers in tensor-parallel pairs, models/mlp.py; the tables and the interaction are then
    replicated over it)."""

    def __init__(self, sizes, dim: int = 16, dense: int = 8, bottom=(64,), top=(64,), sharding: str | None = None,
                 group=None, seed: int = 0, dtype=np.float32, algorithm: str = "auto", sparse: bool = False,
                 tp_group=None):
        embeddings = (LocalEmbeddings(sizes, dim, dtype=dtype, seed=seed, sparse=sparse) if sharding is None else
                      ShardedEmbeddings(sizes, dim, group, sharding, dtype=dtype, algorithm=algorithm, seed=seed,
                                        sparse=sparse))
        # the bottom MLP ends in a ReLU, as DLRM's does; it sees the data: no input gradient
        bottom_units = MLP([dense, *bottom, dim], seed=seed + 1, dtype=dtype, tp_group=tp_group).blocks()
        bottom_units[-1] = nn.Sequential(bottom_units[-1], nn.ReLU())
        f = len(sizes) + 1
        top_units = MLP([dim + f * (f - 1) // 2, *top, 1], seed=seed + 2, dtype=dtype, input_grad=True,
                        tp_group=tp_group).blocks()
        # pipeline units (blocks()): the bottom MLP's carry the embedding vectors past them
        super().__init__(EmbeddingLookup(embeddings), *map(Carry, bottom_units), DotInteraction(), *top_units)

    @property
    def embeddings(self):
        """The tables (LocalEmbeddings or ShardedEmbeddings)."""
        return self.layers[0].embeddings

    def blocks(self) -> list:
        """The pipeline units: the bottom MLP blocks (the first with the lookup before it), the top
        MLP blocks (the first with the interaction before it) - every unit holds data-parallel
        parameters, so every stage has gradients to average."""
        n = len(self.layers)
        top = next(i for i in range(n) if isinstance(self.layers[i], DotInteraction))
        return [nn.Sequential(*self.layers[:2]), *self.layers[2:top], nn.Sequential(*self.layers[top:top + 2]),
                *self.layers[top + 2:]]
