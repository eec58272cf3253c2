"""The main job: synchronous data-parallel training under mpiexec.

    mpiexec -n 2 python -m disttrain.train                        # MLP on the embedded digits data
    mpiexec -n 2 python -m disttrain.train --model gnmt [--batching load_balanced --max-tokens 1024]
    mpiexec -n 2 python -m disttrain.train --model dlrm [--sharding row]   # embeddings sharded over AllToAll
    mpiexec -n 8 python -m disttrain.train --dp 2 --pp 2 --tp 2 --schedule 1f1b --micro-batches 4
    mpiexec -n 4 python -m disttrain.train --steps 1000 --global-batch-size 128 --metrics m.jsonl \\
        --checkpoint-dir ckpt --checkpoint-every 100 [--resume] [--config train.toml]

What is trained - model, data, per-rank batches, loss, evaluation - is a workload
(disttrain/workloads.py): `mlp` (digits, fixed global batch), `gnmt` (GNMT-lite on the
standard-library documentation corpus, variable-length batches from data/bucketing.py; the metrics
then add tokens_per_s, padding, imbalance and the time ranks waited at the gradient synchronisation)
`dlrm` (DLRM on synthetic power-law clicks, embedding tables sharded over the ranks) or
`transformer` (a small GPT-style LM on the same documentation corpus, tensor-/pipeline-parallel).

The ranks form a dp x pp x tp mesh (parallel/mesh.py; `--dp` defaults to world / (pp x tp)). For
the MLP, `--tp` splits its Linear layers in Megatron column/row pairs (for the transformer: its
attention heads and MLP columns) and `--pp` cuts it into
stages balanced by measured layer cost, run with `--schedule` and `--micro-batches`; DataParallel
averages over the dp groups. Every mesh trains the same model as one process on the global batch.

The job lives in disttrain/job/ (config.py, setup.py, resume.py, metrics.py, loop.py); this module
is its entry point. Configuration is a TrainConfig: defaults (then the model's own, workloads.MODEL_DEFAULTS), then an optional --config file (TOML or JSON with the
same keys), then command-line flags. Rank 0 prints a progress line and writes one JSON object per
logged step to --metrics (step, loss, samples_per_s, comm_s, exposed_comm_s, lr, ...; comm times
are seconds per step over the logging interval: comm_s is how long the gradient allreduces ran,
exposed_comm_s the part backward had to wait for). Checkpoints are atomic (checkpoint.py); with
--resume the job continues from the newest one in --checkpoint-dir and reproduces the
uninterrupted run exactly: the sampler's indices depend only on the step, and the parameters,
optimizer state, step count, schedule and the partial logging interval are restored bit for bit. A
checkpoint that does not fit (array shapes, missing optimizer state) is refused; one of a different
run (seed, batch, schedule, steps) too, unless --resume-force.

Exit status: 0 done (or stopped by --stop-after-steps with its checkpoint written); 2 configuration
error, or a checkpoint that cannot be resumed (one message, from rank 0); 3 non-finite gradients
(--on-nonfinite stop, or more than --max-skipped-steps skipped in a row); 4 a checkpoint could not
be written (--on-checkpoint-error stop, or the checkpoint of --stop-after-steps). Every rank exits
with the same status.
"""
from __future__ import annotations

import sys

from disttrain.job import ConfigError, TrainConfig, main, make_parser, parse_config

__all__ = ["ConfigError", "TrainConfig", "main", "make_parser", "parse_config"]

if __name__ == "__main__":
    sys.exit(main())
