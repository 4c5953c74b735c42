"""Thresholded unit maps against concept masks: IoU_k,c = sum_x |M_k(x) and L_c(x)| / sum_x |M_k(x) or L_c(x)|
summed over the dataset, accumulated batch by batch from three counts (intersections, |M_k|, |L_c|).

M_k is the unit's map resized bilinearly (as NetDissect) and compared with its threshold. Each resized
pixel mixes a 2x2 window of the map, so it can only lie above the threshold where that window's
maximum does: the maps are resized only in the few cells (runs of output rows x runs of output columns
sharing one window) whose window reaches the threshold, and only the fired pixels are counted.
Concept masks come as one code per pixel (:func:`slot_codes`: which of its image's concepts cover
it), so a fired pixel is counted with one lookup and one bincount, whatever the number of concepts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from pipeline.dissect.threshold import BLOCK

CELL_PIXELS = 1 << 22  # resized pixels of windows handled at once
LUT_ENTRIES = 1 << 24  # above this many possible (image, slot bits) pairs, codes come from torch.unique


def upsample_weights(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) matrix W with W @ v = 1-D linear resizing of v (align_corners=False, as
    ``F.interpolate``): bilinear resizing of a map A is W_y @ A @ W_x^T."""
    eye = torch.eye(n_in)[:, None, :]
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0, :].T.contiguous()


class Axis(NamedTuple):
    """One axis of a 2-tap resizing matrix of ``n_out`` outputs, by window: window i reads inputs i - 1
    and i (the input padded with its edge values at both ends) and holds the outputs ``start[i]`` +
    0, 1, ...: output ``start[i] + o`` is ``w0[i, o] * v[i - 1] + w1[i, o] * v[i]``. Windows are
    padded to one length with NaN weights (a padding output is NaN, so it never fires)."""

    n_out: int
    start: torch.Tensor
    w0: torch.Tensor
    w1: torch.Tensor


def axis_groups(m: torch.Tensor) -> Axis:
    """The :class:`Axis` of an (n_out, n_in) resizing matrix whose rows have their nonzero weights
    on two neighbouring inputs (as :func:`upsample_weights` and the identity)."""
    n_out, n_in = m.shape
    first = (m != 0).to(torch.uint8).argmax(1)
    rows = torch.arange(n_out)
    w0 = m[rows, first]
    w1 = torch.where(first + 1 < n_in, m[rows, (first + 1).clamp(max=n_in - 1)], torch.zeros(()))
    # a one-tap output on input 0 (the clamped top edge) goes to window 0, as 0 * v[-1] + w0 * v[0]
    top = (first == 0) & (w1 == 0)
    window = torch.where(top, 0, first + 1)
    taps = torch.where(top[:, None], torch.stack([torch.zeros(n_out), w0], 1), torch.stack([w0, w1], 1))
    length = torch.bincount(window, minlength=n_in + 1)
    start = torch.cumsum(length, 0) - length
    size = int(length.max())
    idx = start[:, None] + torch.arange(size)[None, :]
    valid = torch.arange(size)[None, :] < length[:, None]
    w = torch.where(valid[:, :, None], taps[idx.clamp(max=n_out - 1)], torch.tensor(float("nan")))
    return Axis(n_out, start, w[:, :, 0].contiguous(), w[:, :, 1].contiguous())


def _above(maps: torch.Tensor, blocks: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Flat indices into (n,h,w) ``maps`` of values strictly above their pair's ``t`` (n,), looked for
    only in the blocks (:func:`~pipeline.dissect.threshold.block_maxima`, (n,nb)) whose maximum is
    (an index may repeat where an edge block is clamped to the map)."""
    n, h, w = maps.shape
    nb, across = blocks.shape[1], -(-w // BLOCK)
    live = (blocks.float() > t[:, None]).reshape(-1).nonzero()[:, 0]
    pair, b = live // nb, live % nb
    step = torch.arange(BLOCK)
    ys = ((b // across) * BLOCK)[:, None] + step[None, :]
    xs = ((b % across) * BLOCK)[:, None] + step[None, :]
    at = ((pair[:, None, None] * h + ys.clamp(max=h - 1)[:, :, None]) * w + xs.clamp(max=w - 1)[:, None, :]).reshape(-1)
    values = maps.reshape(-1).index_select(0, at).float()
    return at[values > t.index_select(0, pair).repeat_interleave(BLOCK * BLOCK)]


class Codes(NamedTuple):
    """A batch's concept masks as one code per pixel: ``pixels`` (B,P) int64 codes, ``concepts``
    (codes, K) float64, 1 where the code's pixels lie in that concept, ``sizes`` (K,) float64 the
    concepts' pixel counts in the batch."""

    pixels: torch.Tensor
    concepts: torch.Tensor
    sizes: torch.Tensor


def slot_codes(bits: torch.Tensor, ids: torch.Tensor, k: int) -> Codes:
    """Codes of a batch's (B,P) int64 slot bits (bit j: the image's slot j covers the pixel) whose
    slots are concepts ``ids`` (B,S) (-1 = empty; an image's slots are distinct concepts)."""
    b, s = ids.shape
    combined = (torch.arange(b).view(b, 1) * (1 << s) + bits).reshape(-1)
    if b << s <= LUT_ENTRIES:
        present = torch.zeros(b << s, dtype=torch.bool).index_fill_(0, combined, True)
        uniq = present.nonzero()[:, 0]
        codes = (torch.cumsum(present, 0) - 1).index_select(0, combined)
    else:
        uniq, codes = torch.unique(combined, return_inverse=True)
    image, pattern = uniq >> s, uniq & ((1 << s) - 1)
    concepts = torch.zeros(len(uniq), k, dtype=torch.float64)
    for j in range(s):
        on = ((pattern >> j) & 1).bool() & (ids[image, j] >= 0)
        concepts[on.nonzero()[:, 0], ids[image[on], j]] = 1.0
    sizes = torch.bincount(codes, minlength=len(uniq)).double() @ concepts
    return Codes(codes.view(b, -1), concepts, sizes)


class Overlaps:
    """Running intersection and size counts of C units against K concepts (float64 totals)."""

    def __init__(self, units: int, concepts: int) -> None:
        self.intersection = torch.zeros(units, concepts, dtype=torch.float64)
        self.unit_pixels = torch.zeros(units, dtype=torch.float64)
        self.concept_pixels = torch.zeros(concepts, dtype=torch.float64)

    def add_concepts(self, codes: Codes) -> None:
        """A batch's concept sizes, from its :func:`slot_codes`."""
        self.concept_pixels += codes.sizes

    def add_units(self, maps: torch.Tensor, blocks: torch.Tensor, thresholds: torch.Tensor, images: torch.Tensor,
                  units: torch.Tensor, ay: Axis, ax: Axis, codes: Codes) -> None:
        """Fired pixels of (image, unit) pairs: ``maps`` (n,h,w) with their (n,nb) block maxima, each
        resized by ``ay``, ``ax`` and compared with its ``thresholds`` (n,) (fired: strictly above); ``images`` (n,) the pair's
        image in the batch, ``units`` (n,); ``codes`` the batch's :func:`slot_codes`. A pair absent
        from the batch fires nowhere."""
        if not len(maps):
            return
        n, h, w = maps.shape
        t = thresholds.float()
        # (index_select and index_fill_ throughout: torch's advanced indexing is several times slower)
        # the windows (of the map padded with its edges) holding a value above the threshold:
        # window (i, j) reads rows i - 1, i and columns j - 1, j
        at = _above(maps, blocks, t)
        if not len(at):
            return
        pair, y, x = at // (h * w), (at // w) % h, at % w
        first = (pair * (h + 1) + y) * (w + 1) + x
        touched = torch.cat([first + d for d in (0, 1, w + 1, w + 2)])
        # one of each window touched: every toucher writes its number into the window's slot (some
        # write lands) and those whose number stayed are kept; no slot is read unwritten, none zeroed
        slot = torch.empty(n * (h + 1) * (w + 1), dtype=torch.int64)
        mine = torch.arange(len(touched))
        slot.index_copy_(0, touched, mine)
        cell = touched[slot.index_select(0, touched) == mine]
        step = max(1, CELL_PIXELS // (ay.w0.shape[1] * ax.w0.shape[1]))  # bounds the memory of the resized cells
        for lo in range(0, len(cell), step):
            self._count_cells(cell[lo:lo + step], maps, t, images, units, ay, ax, codes)

    def _count_cells(self, cell: torch.Tensor, maps: torch.Tensor, t: torch.Tensor, images: torch.Tensor,
                     units: torch.Tensor, ay: Axis, ax: Axis, codes: Codes) -> None:
        """Resize the windows ``cell`` (flat indices (pair, i, j) into the (n,h+1,w+1) windows), and
        count their fired pixels against the concept codes."""
        n, h, w = maps.shape
        c_units = self.intersection.shape[0]
        gx, gy, pair = cell % (w + 1), (cell // (w + 1)) % (h + 1), cell // ((h + 1) * (w + 1))
        r0, r1 = (gy - 1).clamp(min=0), gy.clamp(max=h - 1)
        c0, c1 = (gx - 1).clamp(min=0), gx.clamp(max=w - 1)
        flat = maps.reshape(-1)
        top, bottom = pair * (h * w) + r0 * w, pair * (h * w) + r1 * w
        a00, a01, a10, a11 = (flat.index_select(0, i).float()[:, None] for i in (top + c0, top + c1, bottom + c0, bottom + c1))
        wy0, wy1 = ay.w0.index_select(0, gy), ay.w1.index_select(0, gy)
        col0 = (a00 * wy0 + a10 * wy1)[:, :, None]  # rows first, then columns, as W_y @ A @ W_x^T
        col1 = (a01 * wy0 + a11 * wy1)[:, :, None]
        up = col0 * ax.w0.index_select(0, gx)[:, None, :] + col1 * ax.w1.index_select(0, gx)[:, None, :]
        fired = (up > t.index_select(0, pair).view(-1, 1, 1)).reshape(-1).nonzero()[:, 0]
        sy, sx = up.shape[1:]
        cell, local = fired // (sy * sx), fired % (sy * sx)
        offset = (torch.arange(sy)[:, None] * ax.n_out + torch.arange(sx)[None, :]).reshape(-1)  # pixel of a cell's (i, j)
        origin = (images.index_select(0, pair) * codes.pixels.shape[1] + ay.start.index_select(0, gy) * ax.n_out
                  + ax.start.index_select(0, gx))
        base = origin.index_select(0, cell) + offset.index_select(0, local)
        unit = units.index_select(0, pair).index_select(0, cell)
        self.unit_pixels += torch.bincount(unit, minlength=c_units).double()
        k = len(codes.concepts)
        counts = torch.bincount(unit * k + codes.pixels.reshape(-1).index_select(0, base), minlength=c_units * k)
        self.intersection += counts.view(c_units, k).double() @ codes.concepts

    def iou(self) -> np.ndarray:
        """(C,K) IoU; 0 where both a unit and a concept are empty."""
        union = self.unit_pixels[:, None] + self.concept_pixels[None, :] - self.intersection
        return torch.where(union > 0, self.intersection / union.clamp_min(1), 0.0).numpy()


def iou_table(layer: str, iou: np.ndarray, concepts: Sequence[str]) -> pd.DataFrame:
    """The long table: layer, unit, concept, iou, rank (1 = the unit's best; ties by concept order)."""
    c, k = iou.shape
    order = np.argsort(-iou, axis=1, kind="stable")
    rank = np.empty_like(order)
    rank[np.arange(c)[:, None], order] = np.arange(1, k + 1)[None, :]
    df = pd.DataFrame({"layer": layer, "unit": np.repeat(np.arange(c), k),
                       "concept": np.tile(np.asarray(concepts, object), c),
                       "iou": iou.reshape(-1).astype(np.float64), "rank": rank.reshape(-1)})
    return df.sort_values(["unit", "rank"], kind="stable").reset_index(drop=True)


def best_concepts(iou: np.ndarray, concepts: Sequence[str], cut: float) -> pd.DataFrame:
    """Per unit: its best concept and IoU, and its label (that concept when the IoU is above ``cut``,
    else None). Without any concept: no label, no concept, IoU 0."""
    if iou.shape[1] == 0:
        n = iou.shape[0]
        return pd.DataFrame({"unit": np.arange(n), "label": [None] * n, "iou": np.zeros(n), "concept": [None] * n})
    best = np.argmax(iou, axis=1)
    value = iou[np.arange(len(best)), best]
    names = np.asarray(concepts, object)[best]
    return pd.DataFrame({"unit": np.arange(len(best)), "label": [n if v > cut else None for n, v in zip(names, value)],
                         "iou": value.astype(np.float64), "concept": names})


def unique_detectors(labels: Sequence[str | None]) -> int:
    """How many distinct concepts the labelled units detect (NetDissect's unique detectors); an
    unlabelled unit is None (or NaN, as pandas may hold it)."""
    return len({v for v in labels if isinstance(v, str)})
