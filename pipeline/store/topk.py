"""Running top-K per neuron under a total order, so that merges are exact and order-independent.

Entries are ordered by value (descending), then row_id (ascending). Because the order is total, the
top-K of a union is the top-K of the union of the parts' top-Ks, whatever the grouping: a store
built in one run, in shards, or killed and resumed ends with identical arrays. Missing entries are
padded with row -1 and value -inf, which sort last.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD_ROW = -1


@dataclass
class TopK:
    """Per-channel top-K: ``values`` (C, n) float32, ``rows`` (C, n) int64, ``argmax`` (C, n) int32."""

    values: np.ndarray
    rows: np.ndarray
    argmax: np.ndarray

    @classmethod
    def empty(cls, channels: int) -> TopK:
        return cls(np.empty((channels, 0), np.float32), np.empty((channels, 0), np.int64),
                   np.empty((channels, 0), np.int32))

    @property
    def channels(self) -> int:
        return self.values.shape[0]

    def valid_counts(self) -> np.ndarray:
        """Number of real (non-padding) entries per channel."""
        return (self.rows != PAD_ROW).sum(axis=1)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """The arrays keyed ``<prefix>_values/_rows/_argmax``, for ``np.savez``."""
        return {f"{prefix}_values": self.values, f"{prefix}_rows": self.rows, f"{prefix}_argmax": self.argmax}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> TopK:
        return cls(np.asarray(arrays[f"{prefix}_values"], np.float32),
                   np.asarray(arrays[f"{prefix}_rows"], np.int64),
                   np.asarray(arrays[f"{prefix}_argmax"], np.int32))


def _sort_entries(values: np.ndarray, rows: np.ndarray, argmax: np.ndarray, k: int) -> TopK:
    """Sort each channel's entries by (value desc, row asc), keep ``k``."""
    order = np.lexsort((rows, -values), axis=-1)[:, :k]
    return TopK(np.take_along_axis(values, order, 1), np.take_along_axis(rows, order, 1),
                np.take_along_axis(argmax, order, 1))


def chunk_topk(values: np.ndarray, rows: np.ndarray, argmax: np.ndarray, k: int,
               floor: np.ndarray | None = None) -> TopK:
    """Exact top-``k`` per channel of an (N, C) block whose row ids are ``rows`` (N,).

    Only entries at or above a per-channel lower bound of the k-th value are sorted: the bound is
    the k-th largest of a row subsample (a subset's k-th largest never exceeds the whole's), raised
    to ``floor`` when given (e.g. the running top-K's k-th value: nothing below it can enter).
    Entries equal to the bound are kept, so ties are resolved by row id as in a full sort.
    """
    n, c = values.shape
    rows = np.asarray(rows, np.int64)
    bound = np.full(c, -np.inf, np.float32)
    step = min(16, n // (4 * k))                        # sample >= 4k rows: ~16k candidates per channel
    if step >= 2 and (floor is None or not np.isfinite(floor).all()):
        sample = values[::step]
        m = sample.shape[0]
        bound = np.partition(sample, m - k, axis=0)[m - k].astype(np.float32)
    if floor is not None:
        bound = np.maximum(bound, floor)
    r, col = np.nonzero(values >= bound)
    vals = values[r, col].astype(np.float32)
    order = np.lexsort((rows[r], -vals, col))
    r, col, vals = r[order], col[order], vals[order]
    starts = np.searchsorted(col, np.arange(c))
    rank = np.arange(len(col)) - starts[col]
    keep = rank < k
    width = min(k, n)
    out = TopK(np.full((c, width), -np.inf, np.float32), np.full((c, width), PAD_ROW, np.int64),
               np.zeros((c, width), np.int32))
    col, rank, r = col[keep], rank[keep], r[keep]
    out.values[col, rank] = vals[keep]
    out.rows[col, rank] = rows[r]
    out.argmax[col, rank] = argmax[r, col]
    return out


def floor_of(top: TopK, k: int) -> np.ndarray | None:
    """The k-th value of each channel of a running top-K, -inf where it holds fewer than k entries."""
    if top.values.shape[1] < k:
        return None
    return np.where(top.rows[:, k - 1] != PAD_ROW, top.values[:, k - 1], -np.inf).astype(np.float32)


def merge(parts: list[TopK], k: int) -> TopK:
    """Exact top-``k`` of the union of several top-K lists (channels must agree)."""
    parts = [p for p in parts if p.values.shape[1]]
    if not parts:
        raise ValueError("merge needs at least one non-empty TopK")
    if len(parts) == 1 and parts[0].values.shape[1] <= k:
        p = parts[0]
        return _sort_entries(p.values, p.rows, p.argmax, k)
    return _sort_entries(np.concatenate([p.values for p in parts], 1),
                         np.concatenate([p.rows for p in parts], 1),
                         np.concatenate([p.argmax for p in parts], 1), k)


def drop_rows(top: TopK, dropped: np.ndarray, k: int) -> tuple[TopK, np.ndarray]:
    """Remove entries whose row is in ``dropped`` (sorted int64) from a top-``k`` list.

    Returns the padded top-K and a per-channel flag saying whether the channel lost an entry while
    its list was full, i.e. whether rows outside the list might now belong in it (the channel's
    top-K must then be recomputed from the data). A list with fewer than ``k`` entries held every
    row of its source, so removing some of them leaves it exact.
    """
    if top.values.shape[1] == 0 or len(dropped) == 0:
        return top, np.zeros(top.channels, bool)
    pos = np.searchsorted(dropped, top.rows).clip(max=len(dropped) - 1)
    hit = (dropped[pos] == top.rows) & (top.rows != PAD_ROW)
    if not hit.any():
        return top, np.zeros(top.channels, bool)
    full = top.valid_counts() >= k
    values = np.where(hit, -np.inf, top.values).astype(np.float32)
    rows = np.where(hit, PAD_ROW, top.rows)
    argmax = np.where(hit, 0, top.argmax).astype(np.int32)
    return _sort_entries(values, rows, argmax, top.values.shape[1]), hit.any(axis=1) & full


def trim(top: TopK) -> TopK:
    """Drop trailing columns that are padding in every channel."""
    keep = int(top.valid_counts().max(initial=0))
    return TopK(top.values[:, :keep].copy(), top.rows[:, :keep].copy(), top.argmax[:, :keep].copy())


def column_topk(values: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Indices of the top-``k`` of one column by (value desc, row asc), for scans past the stored K."""
    n = len(values)
    if n > k:
        cand = np.argpartition(-values, k - 1)[:k]
        thr = values[cand].min()
        cand = np.flatnonzero(values >= thr)
    else:
        cand = np.arange(n)
    order = np.lexsort((rows[cand], -values[cand]))[:k]
    return cand[order]
