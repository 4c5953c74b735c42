"""Class selectivity of a unit from labels alone: the purity of its top images' labels, and the
selectivity index of Morcos et al. 2018, (mu_max - mu_rest) / (mu_max + mu_rest), where mu_max is the
highest class-conditional mean activity and mu_rest the mean of the other classes' means."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def purity(labels: Sequence[int | None]) -> tuple[float, int | None]:
    """(share of the labelled images whose label is the most common one, that label); (nan, None)
    when none is labelled. Ties go to the smaller label."""
    known = np.asarray([v for v in labels if v is not None and v == v], dtype=np.int64)
    if not len(known):
        return float("nan"), None
    values, counts = np.unique(known, return_counts=True)
    best = int(np.argmax(counts))
    return float(counts[best] / len(known)), int(values[best])


def class_means(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(K,C) mean activity per class from per-class sums (K,C) and image counts (K,); nan for an
    empty class."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], np.nan)


def selectivity_index(means: np.ndarray) -> np.ndarray:
    """(C,) index from (K,C) class means (rows of absent classes nan); nan with fewer than two
    classes, 0 where mu_max + mu_rest is 0. Meant for non-negative activity (post-ReLU maps)."""
    present = ~np.isnan(means).any(axis=1)
    m = means[present]
    if len(m) < 2:
        return np.full(means.shape[1], np.nan)
    top = np.argmax(m, axis=0)
    mu_max = m[top, np.arange(m.shape[1])]
    mu_rest = (m.sum(axis=0) - mu_max) / (len(m) - 1)
    total = mu_max + mu_rest
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total != 0, (mu_max - mu_rest) / np.where(total != 0, total, 1), 0.0)
