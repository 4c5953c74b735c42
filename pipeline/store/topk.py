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


def chunk_topk(values: np.ndarray, rows: np.ndarray, argmax: np.ndarray, k: int) -> TopK:
    """Exact top-``k`` per channel of an (N, C) block whose row ids are ``rows`` (N,).

    Uses ``argpartition`` (linear time) and repairs the channels where ties straddle the cut, so the
    result is the same as a full sort by (value desc, row asc).
    """
    n, c = values.shape
    if n == 0:
        return TopK.empty(c)
    rows = np.asarray(rows, np.int64)
    if n <= k:
        vals = np.ascontiguousarray(values.T, dtype=np.float32)
        return _sort_entries(vals, np.broadcast_to(rows, (c, n)).copy(),
                             np.ascontiguousarray(argmax.T, dtype=np.int32), k)
    neg = -values
    idx = np.argpartition(neg, k - 1, axis=0)[:k]                      # (k, C)
    cols = np.arange(c)
    thr = values[idx[k - 1], cols]                                      # k-th largest per channel
    n_ge = (values >= thr).sum(axis=0)
    for j in np.flatnonzero(n_ge > k):                                  # ties at the cut: smallest rows win
        col = values[:, j]
        above = np.flatnonzero(col > thr[j])
        tied = np.flatnonzero(col == thr[j])
        tied = tied[np.argsort(rows[tied], kind="stable")][: k - len(above)]
        idx[:, j] = np.concatenate([above, tied])
    vals = np.take_along_axis(values, idx, 0).T.astype(np.float32)
    am = np.take_along_axis(argmax, idx, 0).T.astype(np.int32)
    return _sort_entries(vals, rows[idx].T.copy(), am, k)


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


def drop_rows(top: TopK, dropped: np.ndarray) -> tuple[TopK, np.ndarray]:
    """Remove entries whose row is in ``dropped`` (sorted int64).

    Returns the padded top-K and a per-channel flag saying whether the channel lost an entry while
    its list was full, i.e. whether rows outside the list might now belong in it (the channel's
    top-K must then be recomputed from the data).
    """
    if top.values.shape[1] == 0 or len(dropped) == 0:
        return top, np.zeros(top.channels, bool)
    pos = np.searchsorted(dropped, top.rows).clip(max=len(dropped) - 1)
    hit = (dropped[pos] == top.rows) & (top.rows != PAD_ROW)
    if not hit.any():
        return top, np.zeros(top.channels, bool)
    values = np.where(hit, -np.inf, top.values).astype(np.float32)
    rows = np.where(hit, PAD_ROW, top.rows)
    argmax = np.where(hit, 0, top.argmax).astype(np.int32)
    return _sort_entries(values, rows, argmax, top.values.shape[1]), hit.any(axis=1)


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
