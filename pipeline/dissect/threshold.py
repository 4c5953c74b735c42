"""Each unit's activation threshold T_k: the m-th largest of its float16 activations over every image
and position, m = ceil(q * N * H * W), found exactly in two streaming passes with bounded memory.

The rule: T_k = ``np.quantile(values, 1 - m / n, method="higher")`` of the unit's n values (the m-th
largest; for q * n a whole number that is the plain top-q quantile). A unit fires where its
upsampled map is strictly above T_k (so a unit that is zero nearly everywhere does not fire on
every zero). Values are compared as float16, the precision the map cache keeps.

Float16 bit patterns map to a 16-bit key that sorts like the values (``order_keys``). Pass one counts
the keys' high bytes per unit (C x 256 counts), which locates the bin holding the m-th largest; pass
two counts the low bytes of the values inside that bin (C x 256 again), reading only the maps of
(image, unit) pairs whose spatial maximum reaches the bin (``candidates``). Memory does not depend on the
number of images, unlike a running top-m buffer (which holds q of every value seen).
"""

from __future__ import annotations

import math

import numpy as np

BINS = 256


def quantile_count(q: float, n: int) -> int:
    """m = ceil(q * n), at least 1 and at most n: how many values lie at or above the threshold."""
    return int(min(n, max(1, math.ceil(q * n - 1e-9))))


def order_keys(values: np.ndarray) -> np.ndarray:
    """uint16 keys of float16 ``values`` that sort in the values' order (negative ones flipped)."""
    bits = np.ascontiguousarray(values, dtype=np.float16).view(np.uint16)
    return np.where(bits & 0x8000, ~bits, bits | 0x8000).astype(np.uint16)


def key_values(keys: np.ndarray) -> np.ndarray:
    """float32 values of ``order_keys`` keys (the inverse map)."""
    keys = np.asarray(keys, dtype=np.uint16)
    bits = np.where(keys & 0x8000, keys & 0x7FFF, ~keys).astype(np.uint16)
    return bits.view(np.float16).astype(np.float32)


# the high byte of a float16's order key, from the high byte of its bits (little-endian: byte 1)
_HIGH_KEY = np.array([(b ^ 0xFF) if b & 0x80 else (b | 0x80) for b in range(256)], dtype=np.uint8)


def coarse_counts(maps: np.ndarray) -> np.ndarray:
    """(C, 256) counts of each unit's keys by high byte, for a (B,C,h,w) batch of float16 maps."""
    maps = np.ascontiguousarray(maps, dtype=np.float16)
    b, c = maps.shape[:2]
    high = _HIGH_KEY[maps.view(np.uint8).reshape(b, c, -1)[:, :, 1::2]]  # (B,C,h*w) high key bytes
    flat = high.astype(np.int32) + (np.arange(c, dtype=np.int32) * BINS)[None, :, None]
    return np.bincount(flat.ravel(), minlength=c * BINS).reshape(c, BINS)


def pick_bins(coarse: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Per unit, the high byte holding the m-th largest key and how many keys lie in higher bins."""
    above_incl = np.cumsum(coarse[:, ::-1], axis=1)[:, ::-1]  # keys with high byte >= b
    bins = (above_incl >= m).sum(axis=1) - 1
    padded = np.concatenate([above_incl, np.zeros((len(bins), 1), above_incl.dtype)], axis=1)
    return bins.astype(np.int64), padded[np.arange(len(bins)), bins + 1].astype(np.int64)


def candidates(maxima: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """(B,C) bool from (B,C) float16 spatial maxima: the (image, unit) pairs whose maximum reaches the
    unit's bin; only their maps hold values in the bin (or above it)."""
    return (order_keys(maxima) >> 8).astype(np.int64) >= bins[None, :]


def fine_counts(maps: np.ndarray, units: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """(C, 256) counts, by low byte, of the keys inside each unit's bin, from (n,h,w) float16 maps of
    (image, unit) pairs (``units`` (n,): each map's unit; C = len(bins))."""
    c = len(bins)
    keys = order_keys(maps).reshape(len(maps), -1)
    unit = np.asarray(units, dtype=np.int64)
    inside = (keys >> 8).astype(np.int64) == bins[unit][:, None]
    low = (keys & 0xFF).astype(np.int64)
    flat = (unit[:, None] * BINS + low)[inside]
    return np.bincount(flat, minlength=c * BINS).reshape(c, BINS)


def thresholds(fine: np.ndarray, bins: np.ndarray, higher: np.ndarray, m: int) -> np.ndarray:
    """float32 (C,) T_k: the m-th largest value, from the fine counts inside each unit's bin."""
    need = m - higher  # how many of the bin's keys, from its top, reach the m-th largest
    above_incl = np.cumsum(fine[:, ::-1], axis=1)[:, ::-1]
    low = (above_incl >= need[:, None]).sum(axis=1) - 1
    return key_values((bins << 8) + low)
