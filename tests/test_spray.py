"""Spectral Relevance Analysis: synthetic explanation maps with known strategies."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.reliance.spray import describe_rule, find_strategies, prepare_maps, spectral_clusters

SIDE = 32


def blobs(rng: np.random.Generator, n: int, centre: tuple[float, float], jitter: float = 2.0,
          sigma: float = 3.0, noise: float = 0.05) -> np.ndarray:
    """n (SIDE, SIDE) maps: a Gaussian blob at a jittered centre plus signed noise."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    out = np.empty((n, SIDE, SIDE), np.float32)
    for i in range(n):
        cy, cx = np.asarray(centre) + rng.uniform(-jitter, jitter, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        out[i] = blob + noise * rng.standard_normal((SIDE, SIDE))
    return out


def shuffled(rng: np.random.Generator, *groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The groups' maps in a random order, and each map's group."""
    maps = np.concatenate(groups)
    group = np.concatenate([np.full(len(g), i) for i, g in enumerate(groups)])
    order = rng.permutation(len(maps))
    return maps[order], group[order]


def test_small_corner_strategy_is_found_and_flagged():
    rng = np.random.default_rng(0)
    maps, group = shuffled(rng, blobs(rng, 40, (16, 16)), blobs(rng, 8, (5, 5)))
    result = find_strategies(maps)
    assert result.sizes == [40, 8]
    assert result.eigenvalues[1] < 0.2 * result.eigenvalues[2]  # the relative eigengap picks 2
    assert np.array_equal(np.flatnonzero(result.labels == 1), np.flatnonzero(group == 1))
    assert result.second == [1]
    assert result.away[1] > 0.9  # the corner sits where the centre maps never go (and is small: flagged)
    assert result.mean_maps.shape == (2, 16, 16) and result.mean_maps.dtype == np.float32
    # the corner cluster's mean map has its mass in the top-left quarter
    corner = result.mean_maps[1]
    assert corner[:8, :8].sum() > 0.7 * corner.sum()  # a quarter of the area; the noise spreads the rest


def test_one_kind_of_map_flags_nothing():
    rng = np.random.default_rng(1)
    maps = blobs(rng, 48, (16, 16))
    result = find_strategies(maps)
    assert result.second == []
    assert sum(result.sizes) == 48 and len(result.sizes) == len(result.away)


def test_three_separated_groups_give_three_clusters():
    rng = np.random.default_rng(2)
    maps, group = shuffled(rng, blobs(rng, 30, (6, 6)), blobs(rng, 20, (6, 26)), blobs(rng, 15, (26, 16)))
    result = find_strategies(maps)
    assert result.sizes == [30, 20, 15]
    assert np.array_equal(result.labels, group)  # groups were numbered by size too


def test_prepare_maps():
    maps = np.zeros((3, 8, 8), np.float32)
    maps[0] = -1.0
    maps[0, :4, :4] = 2.0  # positive mass only in the top-left quarter
    maps[1] = np.arange(64, dtype=np.float32).reshape(8, 8) - 20
    vectors = prepare_maps(maps, size=4)
    assert vectors.shape == (3, 16) and vectors.dtype == np.float32
    assert (vectors >= 0).all()
    np.testing.assert_allclose(vectors[:2].sum(axis=1), 1.0, rtol=1e-6)
    assert (vectors[2] == 0).all()
    first = vectors[0].reshape(4, 4)
    np.testing.assert_allclose(first[:2, :2], 0.25, rtol=1e-6)  # negatives did not dilute it
    assert (first[2:, :] == 0).all() and (first[:, 2:] == 0).all()
    with pytest.raises(ValueError):
        prepare_maps(np.zeros((8, 8)))


def test_deterministic():
    rng = np.random.default_rng(3)
    maps, _ = shuffled(rng, blobs(rng, 40, (16, 16)), blobs(rng, 8, (5, 5)))
    a, b = find_strategies(maps, seed=7), find_strategies(maps, seed=7)
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.eigenvalues, b.eigenvalues)


def test_duplicates_zero_maps_and_tiny_inputs_give_no_nan():
    rng = np.random.default_rng(4)
    one = blobs(rng, 1, (16, 16))
    maps = np.concatenate([np.repeat(one, 20, axis=0), np.zeros((5, SIDE, SIDE), np.float32)])
    result = find_strategies(maps)
    assert np.isfinite(result.eigenvalues).all()
    assert np.isfinite(result.away).all() and np.isfinite(result.mean_maps).all()
    labels, values = spectral_clusters(prepare_maps(maps[:2]))
    assert labels.tolist() == [0, 0] and values.size == 0


def test_objects_anywhere_are_a_continuum_not_strategies():
    """Blobs at uniformly random places (translated objects) give a smooth spectrum: one strategy."""
    rng = np.random.default_rng(5)
    maps = np.concatenate([blobs(rng, 1, tuple(rng.uniform(4, 28, 2)), jitter=0) for _ in range(120)])
    result = find_strategies(maps)
    assert result.sizes == [120] and result.second == []
    assert len(find_strategies(maps, min_gap_ratio=0.0).sizes) > 1  # without the gap rule it splits by place


def test_describe_rule_names_the_thresholds():
    text = describe_rule(0.35, 3, 0.5, 0.2, 0.75)
    assert "35%" in text and "3 maps" in text and "50%" in text and "0.75" in text
