"""Parallel training schedulers: data parallelism (data.py), the dp x pp x tp rank grid (mesh.py),
tensor parallelism (tensor.py), sharded embeddings over AllToAll (embedding.py) and pipelines
(pipeline.py)."""
from .data import DataParallel, broadcast_optimizer_state, broadcast_parameters
from .embedding import SHARDINGS, LocalEmbeddings, ShardedEmbeddings
from .mesh import Mesh
from .replicas import check_replicas
from .pipeline import SCHEDULES, Pipeline, bubble_fraction, measure_layer_costs, partition
from .tensor import ColumnParallelLinear, ParallelAttention, ParallelMLP, RowParallelLinear
from .vocab import VocabParallelCrossEntropy, VocabParallelLinear

__all__ = ["DataParallel", "broadcast_parameters", "broadcast_optimizer_state", "check_replicas", "Mesh", "Pipeline", "SCHEDULES",
           "bubble_fraction", "partition", "measure_layer_costs", "ColumnParallelLinear", "RowParallelLinear",
           "ParallelMLP", "ParallelAttention", "VocabParallelLinear", "VocabParallelCrossEntropy", "ShardedEmbeddings", "LocalEmbeddings", "SHARDINGS"]
