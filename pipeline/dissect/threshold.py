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

Pass one need not count every value: the maxima of BLOCK x BLOCK blocks are values at distinct
positions, so the m-th largest block maximum is at most T_k, and its high byte (``floor_bins``, from
the cheap counts of the block maxima) bounds the bins worth counting. Only maps whose maximum reaches
it are read, and only their values at or above it are counted (``high_counts``).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch.nn import functional as F

BINS = 256
BLOCK = 4  # side of the blocks whose maxima bound each threshold from below


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


def block_maxima(maps: torch.Tensor) -> torch.Tensor:
    """(B,C,nb) maxima of the BLOCK x BLOCK blocks of (B,C,h,w) maps (edges padded with -inf).
    Elementwise maxima of strided slices: torch's reductions over short axes are several times slower."""
    h, w = maps.shape[2:]
    if h % BLOCK or w % BLOCK:
        maps = F.pad(maps, (0, -w % BLOCK, 0, -h % BLOCK), value=float("-inf"))
    rows = functools.reduce(torch.maximum, [maps[:, :, i::BLOCK] for i in range(BLOCK)])
    return functools.reduce(torch.maximum, [rows[:, :, :, j::BLOCK] for j in range(BLOCK)]).flatten(2)


def pick_bins(coarse: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Per unit, the high byte holding the m-th largest key and how many keys lie in higher bins."""
    above_incl = np.cumsum(coarse[:, ::-1], axis=1)[:, ::-1]  # keys with high byte >= b
    bins = (above_incl >= m).sum(axis=1) - 1
    padded = np.concatenate([above_incl, np.zeros((len(bins), 1), above_incl.dtype)], axis=1)
    return bins.astype(np.int64), padded[np.arange(len(bins)), bins + 1].astype(np.int64)


def floor_bins(block_counts: np.ndarray, m: int) -> np.ndarray:
    """Per unit, a high byte at or below the one holding its m-th largest value: that of its m-th largest
    block maximum, from their (C,256) ``coarse_counts``; 0 (count everything) with fewer than m blocks."""
    bins, _ = pick_bins(block_counts, m)
    return np.where(block_counts.sum(axis=1) >= m, bins, 0)


def keys_at_least(maps: np.ndarray, units: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unit, key) of every value of (n,h,w) float16 maps of (image, unit) pairs whose key is at least its
    unit's ``lo`` (C,) key. Non-negative floors are found by comparing the raw 16-bit patterns (which
    sort like non-negative float16 values), so only those values are converted."""
    bits = np.ascontiguousarray(maps, dtype=np.float16).view(np.int16).reshape(len(maps), -1)
    lo = np.asarray(lo, dtype=np.int64)
    raw = np.where(lo >= 0x8000, lo - 0x8000, -0x8000).astype(np.int16)
    at = np.flatnonzero(bits >= raw[units][:, None])  # 1-D: several times faster than a 2-D nonzero
    keys = order_keys(bits.reshape(-1)[at].view(np.float16))
    unit = np.asarray(units, dtype=np.int64)[at // bits.shape[1]]
    keep = keys >= lo[unit]
    return unit[keep], keys[keep]


def high_counts(maps: np.ndarray, units: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """(C, 256) counts of the keys by high byte, only those at or above their unit's ``floor`` (C,) high
    byte, from (n,h,w) float16 maps of (image, unit) pairs (``units`` (n,))."""
    c = len(floor)
    unit, keys = keys_at_least(maps, units, np.asarray(floor, dtype=np.int64) << 8)
    return np.bincount(unit * BINS + (keys >> 8), minlength=c * BINS).reshape(c, BINS)


def candidates(maxima: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """(B,C) bool from (B,C) float16 spatial maxima: the (image, unit) pairs whose maximum reaches the
    unit's bin; only their maps hold values in the bin (or above it)."""
    return (order_keys(maxima) >> 8).astype(np.int64) >= bins[None, :]


def fine_counts(maps: np.ndarray, units: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """(C, 256) counts, by low byte, of the keys inside each unit's bin, from (n,h,w) float16 maps of
    (image, unit) pairs (``units`` (n,): each map's unit; C = len(bins))."""
    c = len(bins)
    unit, keys = keys_at_least(maps, units, np.asarray(bins, dtype=np.int64) << 8)
    inside = (keys >> 8) == bins[unit]
    return np.bincount(unit[inside] * BINS + (keys[inside] & 0xFF), minlength=c * BINS).reshape(c, BINS)


def thresholds(fine: np.ndarray, bins: np.ndarray, higher: np.ndarray, m: int) -> np.ndarray:
    """float32 (C,) T_k: the m-th largest value, from the fine counts inside each unit's bin."""
    need = m - higher  # how many of the bin's keys, from its top, reach the m-th largest
    above_incl = np.cumsum(fine[:, ::-1], axis=1)[:, ::-1]
    low = (above_incl >= need[:, None]).sum(axis=1) - 1
    return key_values((bins << 8) + low)
