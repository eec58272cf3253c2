"""DistributedSampler: which samples each rank trains on at each step - deterministic from the step.

Every epoch is one permutation of the data set drawn from (seed, epoch), identical on all ranks
without communication. Step s of the epoch takes the global batch perm[s*B:(s+1)*B]; rank r takes
its contiguous slice of B/P samples, so the ranks' shards are disjoint and together they are
exactly the batch one process would train on. With ``uneven=True`` B need not divide by P: rank r
takes block r of ``np.array_split(batch, P)`` (shares differ by at most one sample; a rank may get
none when B < P). The global batch - and so the trained model - is then the same at every P, which
is what an elastic restart on fewer ranks needs; the caller must weight each rank's gradient by its
share (``workloads.train_step`` does: count * P / B). Remainder policy: the last N mod B samples of each
permutation are dropped ("drop", default; every sample is still seen over epochs since each
epoch reshuffles) or the final batch is completed from the start of the permutation ("pad").
Because indices depend only on the step, resuming from a checkpoint at step s continues with
exactly the samples the uninterrupted run would have used.
"""
from __future__ import annotations

import numpy as np


class DistributedSampler:
    def __init__(self, num_samples: int, global_batch_size: int, rank: int, world_size: int, seed: int = 0,
                 shuffle: bool = True, remainder: str = "drop", uneven: bool = False):
        if world_size < 1:
            raise ValueError(f"world size must be >= 1, got {world_size}")
        if global_batch_size % world_size and not uneven:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by the {world_size} ranks: "
                             f"use a multiple of {world_size} (or uneven=True and weight the gradients by share)")
        if remainder not in ("drop", "pad"):
            raise ValueError(f"remainder must be 'drop' or 'pad', got {remainder!r}")
        if global_batch_size > num_samples:
            raise ValueError(f"global batch size {global_batch_size} exceeds the {num_samples} samples")
        self.n, self.B, self.rank, self.P = num_samples, global_batch_size, rank, world_size
        self.seed, self.shuffle, self.remainder = seed, shuffle, remainder
        # block r of np.array_split: the first B mod P ranks hold one sample more
        small, extra = divmod(global_batch_size, world_size)
        self.lo = rank * small + min(rank, extra)
        self.local = small + (rank < extra)
        full, rest = divmod(num_samples, global_batch_size)
        self.steps_per_epoch = full + (1 if rest and remainder == "pad" else 0)
        self._epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                          else np.arange(self.n))
            self._epoch = epoch
        return self._perm

    def global_batch(self, step: int) -> np.ndarray:
        epoch, s = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch)
        idx = perm[s * self.B:(s + 1) * self.B]
        if idx.shape[0] < self.B:  # "pad": complete from the start of the permutation
            idx = np.concatenate([idx, perm[:self.B - idx.shape[0]]])
        return idx

    def indices(self, step: int) -> np.ndarray:
        """This rank's sample indices for global step `step` (0-based)."""
        return self.global_batch(step)[self.lo:self.lo + self.local]
