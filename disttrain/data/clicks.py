"""Synthetic click-through data for DLRM-style recommenders, generated offline from a seed.

Each sample has `dense` continuous features and one categorical id per table. Ids follow a
truncated power law (Zipf: P(rank k) ~ 1 / k**alpha) as real categorical features do - a few hot
items in most samples, a long tail seen rarely - and the popularity ranks are scattered over the id
space by a fixed permutation per table (as hashed ids are), so row-wise shards see similar load.

Labels come from a hidden logistic "teacher": a weight per (table, id), a linear term of the dense
features and a pairwise interaction between the first two tables' latent vectors; a click is drawn
from sigmoid(teacher logit). A model that learns the embeddings beats the base rate; the teacher's
own log-loss (``Clicks.bayes_logloss``) is the floor.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Clicks:
    dense: np.ndarray  # (n, n_dense) float
    ids: np.ndarray  # (n, tables) int64
    clicks: np.ndarray  # (n,) float 0/1
    sizes: list  # rows per table
    bayes_logloss: float  # the teacher's expected log-loss on these samples

    def __len__(self) -> int:
        return len(self.clicks)

    def take(self, idx) -> "Clicks":
        return Clicks(self.dense[idx], self.ids[idx], self.clicks[idx], self.sizes, self.bayes_logloss)


def power_law_ids(rng, n: int, rows: int, alpha: float, perm=None) -> np.ndarray:
    """n ids in [0, rows) with P(popularity rank k) proportional to (k + 1)**-alpha."""
    w = np.arange(1, rows + 1, dtype=np.float64) ** -alpha
    cdf = np.cumsum(w / w.sum())
    ranks = np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), rows - 1)
    return (perm[ranks] if perm is not None else ranks).astype(np.int64)


def synthetic_clicks(n: int, sizes=(1000, 500, 200, 100, 50, 20), dense: int = 8, alpha: float = 1.05,
                     seed: int = 0, dtype=np.float32) -> Clicks:
    """`n` samples; the teacher depends on `seed` only, so train and test splits drawn with
    different `n` from the same seed share it (use ``split``)."""
    sizes = [int(s) for s in sizes]
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(s) for s in sizes]
    w_id = [rng.normal(0, 1.0, s) for s in sizes]  # per-id click propensity
    lat = [rng.normal(0, 1.0, (s, 4)) for s in sizes[:2]]  # latent vectors of the first two tables
    w_dense = rng.normal(0, 0.5, dense)
    x = rng.standard_normal((n, dense))
    ids = np.stack([power_law_ids(rng, n, s, alpha, p) for s, p in zip(sizes, perms)], axis=1)
    logit = -1.0 + x @ w_dense + sum(w[ids[:, t]] for t, w in enumerate(w_id)) / np.sqrt(len(sizes))
    if len(sizes) >= 2:
        logit += (lat[0][ids[:, 0]] * lat[1][ids[:, 1]]).sum(axis=1) / 2
    p = 1 / (1 + np.exp(-logit))
    y = (rng.random(n) < p).astype(dtype)
    bayes = float(-(p * np.log(p) + (1 - p) * np.log(1 - p)).mean())
    return Clicks(x.astype(dtype), ids, y, sizes, bayes)


def split(data: Clicks, test_fraction: float = 0.1) -> tuple:
    """(train, test): the last `test_fraction` of the samples are held out (samples are i.i.d.)."""
    k = len(data) - int(round(len(data) * test_fraction))
    return data.take(slice(0, k)), data.take(slice(k, None))
