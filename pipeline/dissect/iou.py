"""Thresholded unit maps against concept masks: IoU_k,c = sum_x |M_k(x) and L_c(x)| / sum_x |M_k(x) or L_c(x)|
summed over the dataset, accumulated batch by batch from three counts (intersections, |M_k|, |L_c|)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F


def upsample_weights(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) matrix W with W @ v = 1-D linear resizing of v (align_corners=False, as
    ``F.interpolate``): bilinear resizing of a map A is W_y @ A @ W_x^T, two small matmuls."""
    eye = torch.eye(n_in)[:, None, :]
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0, :].T.contiguous()


def fire(maps: torch.Tensor, thresholds: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
    """(n,h,w) maps of (image, unit) pairs resized bilinearly (as NetDissect) by ``wy``, ``wx`` and
    thresholded at their unit's value (``thresholds`` (n,)): bool (n, H*W), True strictly above."""
    up = wy @ maps.float() @ wx.T
    return (up > thresholds.float().view(-1, 1, 1)).flatten(1)


class Overlaps:
    """Running intersection and size counts of C units against K concepts (float64 totals)."""

    def __init__(self, units: int, concepts: int) -> None:
        self.intersection = torch.zeros(units, concepts, dtype=torch.float64)
        self.unit_pixels = torch.zeros(units, dtype=torch.float64)
        self.concept_pixels = torch.zeros(concepts, dtype=torch.float64)

    def add_concepts(self, masks: torch.Tensor, ids: torch.Tensor) -> None:
        """A batch's concept sizes: ``masks`` (B,S,P) bool slots, ``ids`` (B,S) their concept (-1 = empty)."""
        valid = ids.reshape(-1) >= 0
        self.concept_pixels.index_add_(0, ids.reshape(-1)[valid],
                                       masks.reshape(-1, masks.shape[-1])[valid].double().sum(1))

    def add_units(self, fired: torch.Tensor, images: torch.Tensor, units: torch.Tensor, masks: torch.Tensor,
                  ids: torch.Tensor) -> None:
        """Fired pixels of (image, unit) pairs: ``fired`` (n,P) bool from :func:`fire`, ``images`` (n,)
        the pair's image in the batch, ``units`` (n,); ``masks``/``ids`` as in :meth:`add_concepts`.
        A pair absent from the batch fires nowhere.

        A unit fires on few pixels (its top quantile), so the fired pixels are listed and each is
        looked up in its image's few concept slots: the cost follows the fired pixels, not the maps."""
        c, k = self.intersection.shape
        pair, pixel = fired.nonzero(as_tuple=True)
        unit, image = units[pair], images[pair]
        self.unit_pixels += torch.bincount(unit, minlength=c).double()
        for s in range(ids.shape[1]):
            col = ids[image, s]
            hit = (col >= 0) & masks[image, s, pixel]
            self.intersection += torch.bincount(unit[hit] * k + col[hit], minlength=c * k).view(c, k).double()

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
