"""Spectral Relevance Analysis (SpRAy; Lapuschkin et al. 2019, "Unmasking Clever Hans predictors").

One class's explanation maps are shrunk to small normalised relevance maps and clustered
spectrally; each cluster is a strategy the model uses for that class, found without annotation.
A small cluster whose mean map looks unlike the rest of the class is flagged as "a second
strategy": a candidate Clever Hans cue (a watermark, a border, a background) for a person to check.

Affinity: Gaussian weights on the symmetric k-NN graph, with a local scale per point
(Zelnik-Manor & Perona 2004): w_ij = exp(-d_ij^2 / (s_i s_j)), s_i the distance to the point's
k-th neighbour. Binary k-NN edges would tie a strategy with fewer than k+1 members to the main
group by as many forced edges as it has internal ones, hiding exactly the small clusters SpRAy is
for; Gaussian weights make those forced links weak. A local scale instead of one bandwidth keeps
sharp and diffuse maps (whose distances differ in scale) both connected within their group.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-12  # keeps degrees, scales and row norms of isolated or duplicate points above zero


@dataclass
class Strategies:
    """The strategies found in one class's explanation maps."""

    labels: np.ndarray  # (N,) int cluster of each map, clusters numbered by size, largest = 0
    sizes: list[int]  # members per cluster
    mean_maps: np.ndarray  # (k, size, size) float32 mean of the normalised maps per cluster
    eigenvalues: np.ndarray  # the smallest eigenvalues of the normalised graph Laplacian looked at
    second: list[int]  # clusters flagged as "a second strategy"
    away: list[float]  # per cluster: share of its mean map's mass where the class's other maps do not go


def prepare_maps(maps: np.ndarray, size: int = 16) -> np.ndarray:
    """(N, H, W) maps -> (N, size*size) float32 rows: positive part, area-downsampled, each summing
    to 1 (an all-zero map stays zero).

    Positive relevance is the evidence *for* the class; downsampling removes pixel-level noise and
    small shifts; normalising compares where the mass lies, not how much of it a map has.
    """
    maps = np.asarray(maps)
    if maps.ndim != 3 or size < 1:
        raise ValueError(f"expected (N, H, W) maps and size >= 1, got shape {maps.shape}, size {size}")
    positive = torch.from_numpy(np.clip(maps, 0, None).astype(np.float32))
    small = F.adaptive_avg_pool2d(positive[:, None], size).reshape(len(maps), size * size).numpy()
    sums = small.sum(axis=1, keepdims=True)
    np.divide(small, sums, out=small, where=sums > 0)
    return np.ascontiguousarray(small, dtype=np.float32)


def _affinity(vectors: np.ndarray, k: int) -> np.ndarray:
    """Dense symmetric (N, N) Gaussian k-NN affinity with local scales (see the module docstring)."""
    n = len(vectors)
    index = faiss.IndexFlatL2(vectors.shape[1])
    index.add(vectors)
    dist2, ids = index.search(vectors, k + 1)  # squared L2, ascending; usually self first
    # Column k is the k-th other neighbour's distance whether or not self was returned (self is left
    # out only when k+1 others tie with it at distance 0).
    scale = np.maximum(np.sqrt(np.maximum(dist2[:, k], 0.0)), EPS).astype(np.float64)
    keep = ids != np.arange(n)[:, None]
    keep[keep.all(axis=1), -1] = False  # self not returned: keep the k nearest others
    rows, cols = np.nonzero(keep)
    nbr = ids[rows, cols]
    weights = np.exp(-dist2[rows, cols].astype(np.float64) / (scale[rows] * scale[nbr]))
    affinity = np.zeros((n, n))
    affinity[rows, nbr] = weights
    return np.maximum(affinity, affinity.T)


def spectral_clusters(
    vectors: np.ndarray, k_neighbours: int = 10, max_clusters: int = 8, seed: int = 0, min_gap_ratio: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster labels (numbered by size, largest = 0) and the Laplacian eigenvalues looked at.

    Symmetric k-NN graph from exact FAISS search (k_neighbours clipped to N-1), Gaussian affinity,
    normalised Laplacian L = I - D^-1/2 A D^-1/2 (dense eigh: O(N^3), fine for one class's maps),
    number of clusters k in 2..max_clusters at the largest relative eigengap
    (lambda_k - lambda_{k-1}) / lambda_k: k clusters make k eigenvalues near zero, so the k-th gap
    is nearly all of lambda_k. One cluster when no relative gap reaches ``min_gap_ratio``: maps that
    vary continuously, such as objects placed anywhere, give a smooth spectrum, not strategies. Then k-means
    (faiss, seeded, 10 restarts) on the row-normalised first eigenvectors. Fewer than 3 vectors
    give one cluster and no eigenvalues.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(vectors)
    if n < 3:
        return np.zeros(n, dtype=np.int64), np.zeros(0)
    affinity = _affinity(vectors, max(1, min(k_neighbours, n - 1)))
    inv_sqrt = 1.0 / np.sqrt(affinity.sum(axis=1) + EPS)
    laplacian = np.eye(n) - inv_sqrt[:, None] * affinity * inv_sqrt[None, :]
    values, vecs = np.linalg.eigh(laplacian)
    looked_at = values[: min(max_clusters + 1, n)]
    ratios = (looked_at[2:] - looked_at[1:-1]) / np.maximum(looked_at[2:], EPS)  # k = 2, 3, ...
    n_clusters = int(np.argmax(ratios)) + 2 if len(ratios) and ratios.max() >= min_gap_ratio else 1
    if n_clusters == 1:
        return np.zeros(n, dtype=np.int64), looked_at
    embedding = vecs[:, :n_clusters]
    embedding = embedding / np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), EPS)
    embedding = np.ascontiguousarray(embedding, dtype=np.float32)
    kmeans = faiss.Kmeans(
        n_clusters, n_clusters, niter=50, nredo=10, seed=seed, verbose=False,
        min_points_per_centroid=1, max_points_per_centroid=n,
    )
    kmeans.train(embedding)
    raw = kmeans.index.search(embedding, 1)[1][:, 0]
    counts = np.bincount(raw, minlength=n_clusters)
    order = [c for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
    renumber = np.empty(n_clusters, dtype=np.int64)
    renumber[order] = np.arange(len(order))
    return renumber[raw], looked_at


def away_share(cluster: np.ndarray, rest: np.ndarray, rest_level: float) -> float:
    """Share of ``cluster``'s mass on pixels where ``rest`` is below ``rest_level`` times its max:
    how much of a strategy sits where the class's other maps do not go. A rest that covers the
    whole image (objects anywhere, as in translated data) leaves no room to sit away from it."""
    total = float(cluster.sum())
    if total <= 0:
        return 0.0
    top = float(rest.max())
    low = rest < rest_level * top if top > 0 else np.ones_like(rest, dtype=bool)
    return float(cluster[low].sum()) / total


def find_strategies(
    maps: np.ndarray,
    size: int = 16,
    k_neighbours: int = 10,
    max_clusters: int = 8,
    max_fraction: float = 0.35,
    min_size: int = 3,
    min_away: float = 0.5,
    rest_level: float = 0.2,
    min_gap_ratio: float = 0.75,
    seed: int = 0,
) -> Strategies:
    """One class's strategies: cluster its (N, H, W) explanation maps and flag second strategies.

    A cluster is flagged when it is small (min_size <= members <= max_fraction * N) and sits away
    from the class's other maps: at least ``min_away`` of its mean map's mass lies where the other
    members' mean map is below ``rest_level`` of its max (:func:`away_share`). A cluster holding
    the whole class has no others and sits away by 0.
    """
    vectors = prepare_maps(maps, size)
    labels, eigenvalues = spectral_clusters(vectors, k_neighbours, max_clusters, seed, min_gap_ratio)
    n = len(vectors)
    k = int(labels.max()) + 1 if n else 0
    sums = np.zeros((k, size * size))
    np.add.at(sums, labels, vectors.astype(np.float64))
    sizes = np.bincount(labels, minlength=k)
    mean_maps = (sums / np.maximum(sizes, 1)[:, None]).reshape(k, size, size).astype(np.float32)
    total = sums.sum(axis=0)
    away = [away_share(sums[c], total - sums[c], rest_level) if sizes[c] < n else 0.0 for c in range(k)]
    second = [c for c in range(k) if min_size <= sizes[c] <= max_fraction * n and away[c] >= min_away]
    return Strategies(labels=labels, sizes=[int(s) for s in sizes], mean_maps=mean_maps, eigenvalues=eigenvalues,
                      second=second, away=away)


def describe_rule(max_fraction: float, min_size: int, min_away: float, rest_level: float,
                  min_gap_ratio: float) -> str:
    """The flag rule in words, for the report."""
    return (f"a cluster of at least {min_size} maps and at most {max_fraction:.0%} of the class (SpRAy: spectral "
            f"clustering of the class's 16x16 maps, clusters only at a relative eigengap of {min_gap_ratio:g} or more) with at least {min_away:.0%} of its mean map's mass where the "
            f"class's other maps' mean is below {rest_level:g} of its max")
