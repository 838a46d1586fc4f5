"""Outer folds and the inner train/validation split.

The test part of a fold is returned separately and is never used for fitting, early
stopping or model selection: searches see only ``train`` and ``val``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dataset import DataError, Dataset


@dataclass(frozen=True)
class FoldSplit:
    """Row positions of one outer fold: ``train`` + ``val`` (inner) and the held-out ``test``."""

    fold: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def __post_init__(self) -> None:
        a, b, c = set(self.train.tolist()), set(self.val.tolist()), set(self.test.tolist())
        if a & b or a & c or b & c:
            raise AssertionError("fold parts overlap")


def outer_folds(dataset: Dataset, n_folds: int = 5, seed: int = 0) -> list[np.ndarray]:
    """Test positions of each outer fold: matbench's official folds, else a seeded K-fold."""
    if dataset.official_folds is not None:
        return dataset.official_folds
    if len(dataset) < n_folds:
        raise DataError(f"{dataset.name}: {len(dataset)} rows cannot make {n_folds} folds")
    order = np.random.default_rng(seed).permutation(len(dataset))
    return [np.sort(part) for part in np.array_split(order, n_folds)]


def split_fold(dataset: Dataset, fold: int, val_fraction: float = 0.1, seed: int = 0, n_folds: int = 5) -> FoldSplit:
    """Split outer fold ``fold``: its test part, and its training part into train + inner val."""
    folds = outer_folds(dataset, n_folds=n_folds, seed=seed)
    if not 0 <= fold < len(folds):
        raise DataError(f"{dataset.name}: fold {fold} does not exist (folds 0..{len(folds) - 1})")
    test = np.sort(np.asarray(folds[fold], dtype=np.int64))
    mask = np.ones(len(dataset), dtype=bool)
    mask[test] = False
    rest = np.flatnonzero(mask)
    if len(rest) < 2:
        raise DataError(f"{dataset.name}: fold {fold} leaves {len(rest)} training rows; need at least 2")
    rng = np.random.default_rng([seed, fold])
    shuffled = rng.permutation(rest)
    n_val = min(max(1, int(round(val_fraction * len(rest)))), len(rest) - 1)
    return FoldSplit(
        fold=fold,
        train=np.sort(shuffled[n_val:]),
        val=np.sort(shuffled[:n_val]),
        test=test,
    )


def limit_rows(dataset: Dataset, limit: int | None, seed: int = 0) -> Dataset:
    """A seeded random subset of ``limit`` rows (official fold membership is preserved)."""
    if limit is None or limit >= len(dataset):
        return dataset
    keep = np.sort(np.random.default_rng(seed).choice(len(dataset), size=limit, replace=False))
    return dataset.subset(keep)
