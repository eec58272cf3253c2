"""Embedded data sets that need no download at run time."""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str


def load_digits(test_fraction: float = 0.2, split_seed: int = 0, dtype=np.float32) -> Dataset:
    """UCI handwritten digits (vendored; see DATA_LICENSE.md): 1,797 8x8 images, 10 classes.

    Pixels are scaled to [0, 1]. The train/test split is stratified-by-shuffle with a fixed seed,
    so it is identical on every rank and every run.
    """
    with gzip.open(os.path.join(HERE, "digits.csv.gz"), "rt") as f:
        raw = np.loadtxt(f, delimiter=",", dtype=np.float64)
    x, y = (raw[:, :-1] / 16.0).astype(dtype), raw[:, -1].astype(np.int64)
    perm = np.random.default_rng(split_seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    te, tr = perm[:n_test], perm[n_test:]
    return Dataset(x[tr], y[tr], x[te], y[te], 10, "digits")


DATASETS = {"digits": load_digits}


def load(name: str, **kw) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")
    return DATASETS[name](**kw)
