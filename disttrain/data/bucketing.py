"""Batching variable-length samples across ranks: naive, bucketed and load-balanced strategies.

Variable-length data wastes work twice in data-parallel training: on padding inside a batch, and on
waiting - the gradient allreduce makes every rank wait for the one that drew the longest
sentences. The strategies (selected by name, one signature in ``STRATEGIES``):

- ``naive``: shuffle, shard the samples over the ranks, batch each shard in order. Lengths in a
  batch are random (much padding) and differ between ranks (much waiting).
- ``bucketed``: shard as above, then each rank sorts its shard by length and batches neighbours
  (per-rank length buckets), batches in random order. Little padding, but in one step rank 0 may
  hold short sentences and rank 1 long ones: the imbalance remains.
- ``load_balanced``: the fix from the GNMT-on-CPU-clusters work the issue cites: every rank
  processes the full, identically shuffled list, sorts it into global length buckets, forms each
  *global* minibatch from one bucket and takes its own slice of it (every P-th sample of the
  length-sorted batch). Little padding *and* every rank gets the same lengths in the same step.

Batch sizing: either a fixed ``global_batch`` (samples per step over all ranks) or a token budget
``max_tokens`` (padded tokens, i.e. samples x longest length, per rank per step), which keeps the
work per step roughly constant whatever the lengths.

Guarantees, for every strategy (tested): decisions depend only on (lengths, seed, epoch), so every
rank computes the same plan with no communication; each sample appears exactly once per epoch
(nothing dropped, nothing repeated); every rank gets the same number of steps (a rank whose shard
ran out gets empty batches rather than leaving the others waiting in a collective forever).
Because batches can differ in size between ranks, the plan also gives every step's global token
count, so the training loop can weight each rank's gradient to the exact global-batch average.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..registry import Registry


@dataclass
class EpochPlan:
    """One epoch's batches: ``steps[s][r]`` = sample indices rank r processes at step s."""

    steps: list
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.steps)

    def batches(self, rank: int) -> list:
        """Rank `rank`'s index arrays, one per step (possibly empty)."""
        return [s[rank] for s in self.steps]

    def step_stats(self, s: int) -> dict:
        """Real tokens per rank, padded tokens per rank, padding fraction, imbalance (max / mean real)."""
        real = np.array([int(self.lengths[i].sum()) for i in self.steps[s]], np.int64)
        padded = np.array([len(i) * (int(self.lengths[i].max()) if len(i) else 0) for i in self.steps[s]], np.int64)
        mean = real.mean()
        return dict(real_tokens=real, padded_tokens=padded,
                    padding=1.0 - real.sum() / padded.sum() if padded.sum() else 0.0,
                    imbalance=float(real.max() / mean) if mean > 0 else 1.0)

    def summary(self) -> dict:
        """Epoch totals: padding fraction of all padded tokens, mean and max per-step imbalance."""
        st = [self.step_stats(s) for s in range(len(self))]
        real = sum(int(x["real_tokens"].sum()) for x in st)
        padded = sum(int(x["padded_tokens"].sum()) for x in st)
        imb = [x["imbalance"] for x in st]
        return dict(steps=len(st), real_tokens=real, padded_tokens=padded,
                    padding=1.0 - real / padded if padded else 0.0,
                    imbalance_mean=float(np.mean(imb)) if imb else 1.0, imbalance_max=float(max(imb, default=1.0)))


class Batcher:
    """Plans each epoch's batches for `world` ranks from per-sample lengths.

    Args:
        lengths: tokens per sample (what determines its padded size).
        strategy: "naive", "bucketed" or "load_balanced".
        world: number of data-parallel ranks.
        global_batch: samples per step over all ranks (naive, bucketed: must divide by world), or
        max_tokens: padded tokens per rank per step (a sample longer than this is an error).
        seed: shuffling seed; epoch e reshuffles with (seed, e).

    Example:
        >>> b = Batcher(lengths, "load_balanced", world=4, max_tokens=4096, seed=0)
        >>> plan = b.plan(epoch)
        >>> for s, idx in enumerate(plan.batches(rank)): ...
    """

    def __init__(self, lengths, strategy: str, world: int, *, global_batch: int | None = None,
                 max_tokens: int | None = None, seed: int = 0):
        self.lengths = np.asarray(lengths, np.int64)
        problems = []
        if self.lengths.ndim != 1 or self.lengths.size == 0:
            problems.append("lengths must be a non-empty 1-D sequence")
        elif self.lengths.min() <= 0:
            problems.append(f"every length must be positive (sample {int(self.lengths.argmin())} has "
                            f"{int(self.lengths.min())})")
        if strategy not in STRATEGIES:
            problems.append(f"unknown batching strategy {strategy!r}; choose one of {list(STRATEGIES)}")
        if not isinstance(world, (int, np.integer)) or world < 1:
            raise ValueError("; ".join(problems + [f"world must be a positive int, got {world!r}"]))
        if (global_batch is None) == (max_tokens is None):
            problems.append("give exactly one of global_batch (samples per step) and max_tokens (per rank)")
        elif global_batch is not None and (global_batch <= 0 or (global_batch % world and strategy != "load_balanced")):
            problems.append(f"global_batch {global_batch} must be positive and divisible by the {world} ranks "
                            "(load_balanced takes any: its global batches are cut before they are shared)")
        elif max_tokens is not None and not problems and max_tokens < self.lengths.max():
            problems.append(f"max_tokens {max_tokens} is smaller than the longest sample "
                            f"({int(self.lengths.max())} tokens, sample {int(self.lengths.argmax())})")
        if problems:
            raise ValueError("; ".join(problems))
        self.strategy, self.world, self.seed = strategy, int(world), seed
        self.global_batch, self.max_tokens = global_batch, max_tokens

    def plan(self, epoch: int) -> EpochPlan:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.lengths.size)
        steps = STRATEGIES[self.strategy](self, order, rng)
        return EpochPlan(steps, self.lengths)

    # ------------------------------------------------------------------ shared building blocks
    def _chunks(self, idx: np.ndarray, ranks: int) -> list:
        """Cut idx (in order) into consecutive batches for `ranks` ranks together: global_batch /
        world * ranks samples each, or as many as fit max_tokens per rank."""
        if self.global_batch is not None:  # all ranks together: the whole global batch, divisible or not
            size = self.global_batch if ranks == self.world else self.global_batch // self.world * ranks
            return [idx[i:i + size] for i in range(0, len(idx), size)]
        out, start, longest = [], 0, 0
        lens = self.lengths[idx]
        for j in range(len(idx)):
            longest_j = max(longest, int(lens[j]))
            count = j - start + 1
            if -(-count // ranks) * longest_j > self.max_tokens:  # the fullest rank's padded tokens
                out.append(idx[start:j])
                start, longest_j = j, int(lens[j])
            longest = longest_j
        if start < len(idx):
            out.append(idx[start:])
        return out

    def _by_length(self, idx: np.ndarray) -> np.ndarray:
        """idx sorted by length; equal lengths keep their (shuffled) order - random within a length."""
        return idx[np.argsort(self.lengths[idx], kind="stable")]

    def _equalize(self, per_rank: list) -> list:
        """Per-rank batch lists -> steps, padding short lists with empty batches (equal step counts)."""
        n = max(len(b) for b in per_rank)
        empty = np.zeros(0, np.int64)
        return [[b[s] if s < len(b) else empty for b in per_rank] for s in range(n)]


STRATEGIES = Registry("batching strategy")


@STRATEGIES.register("naive")
def _naive(b: Batcher, order, rng) -> list:
    return b._equalize([b._chunks(shard, 1) for shard in np.array_split(order, b.world)])


@STRATEGIES.register("bucketed")
def _bucketed(b: Batcher, order, rng) -> list:
    per_rank = []
    for shard in np.array_split(order, b.world):
        batches = b._chunks(b._by_length(shard), 1)
        per_rank.append([batches[i] for i in rng.permutation(len(batches))])
    return b._equalize(per_rank)


@STRATEGIES.register("load_balanced")
def _load_balanced(b: Batcher, order, rng) -> list:
    batches = b._chunks(b._by_length(order), b.world)  # global batches, each from one length range
    # rank r takes every P-th sample of the length-sorted global batch: equal counts (+-1) and
    # near-equal tokens; batch order shuffled so lengths do not rise through the epoch
    return [[g[r::b.world] for r in range(b.world)] for g in (batches[i] for i in rng.permutation(len(batches)))]


#: name -> fn(batcher, shuffled order, rng) -> steps (list of per-rank index arrays)
