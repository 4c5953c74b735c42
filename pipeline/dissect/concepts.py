"""Concept masks from a dataset's own annotations, in the model's input frame at the IoU resolution.

Per image: its class ("3", from the object mask, or the box when there is no usable mask), each
fragment box (concept "fragment", recorded by clutter digits), each extra mask the manifest's
``concepts`` column names (``name=mask.png;name2=other.png``), and "background" (outside the object
and every fragment box; only for images with a box or a mask).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.nn import functional as F

from pipeline.selection import input_box, input_mask

FRAGMENT = "fragment"
BACKGROUND = "background"


def parse_concepts(text: Any) -> list[tuple[str, str]]:
    """``name=path;name2=path2`` -> [(name, path)]; empty for None/NaN/''. Items without '=' are skipped."""
    if text is None or (isinstance(text, float) and math.isnan(text)) or not str(text).strip():
        return []
    out = []
    for item in str(text).split(";"):
        name, sep, path = item.partition("=")
        if sep and name.strip() and path.strip():
            out.append((name.strip(), path.strip()))
    return out


def parse_boxes(text: Any) -> list[tuple[float, float, float, float]]:
    """``x0,y0,x1,y1;...`` -> boxes (exclusive ends, image pixels); empty for None/NaN/''."""
    if text is None or (isinstance(text, float) and math.isnan(text)) or not str(text).strip():
        return []
    return [tuple(float(v) for v in item.split(",")) for item in str(text).split(";") if item.strip()]


def concept_names(class_names: Sequence[str], records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every concept of a dataset, in a fixed order: classes, fragment (when any image records
    fragments), extra concepts (sorted), background (when any image has a box or an object mask)."""
    extra: set[str] = set()
    fragments = located = False
    for rec in records:
        extra.update(n for n, _ in parse_concepts(rec.get("concepts")))
        fragments = fragments or bool(parse_boxes(rec.get("fragment_boxes")))
        located = located or bool(rec.get("mask")) or _box_of(rec) is not None
    names = list(dict.fromkeys(str(c) for c in class_names))
    names += [FRAGMENT] if fragments and FRAGMENT not in names else []
    names += sorted(extra - set(names))
    return names + ([BACKGROUND] if located and BACKGROUND not in names else [])


def box_raster(box: Sequence[float], input_hw: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(H,W) bool at ``size``: the pixels whose centres fall in ``box`` (input-frame coordinates)."""
    sy, sx = input_hw[0] / size[0], input_hw[1] / size[1]
    x0, y0, x1, y1 = box
    # centre (i + 0.5) * s lies in [lo, hi)  <=>  ceil(lo / s - 0.5) <= i < ceil(hi / s - 0.5)
    r0, r1 = (min(size[0], max(0, math.ceil(v / sy - 0.5))) for v in (y0, y1))
    c0, c1 = (min(size[1], max(0, math.ceil(v / sx - 0.5))) for v in (x0, x1))
    out = torch.zeros(size, dtype=torch.bool)
    out[r0:r1, c0:c1] = True
    return out


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """An (H,W) bool mask at ``size`` (nearest neighbour)."""
    if tuple(mask.shape) == tuple(size):
        return mask
    return F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5


def _box_of(rec: Mapping[str, Any]) -> tuple[float, float, float, float] | None:
    values = [rec.get(k) for k in ("box_x0", "box_y0", "box_x1", "box_y1")]
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        return None
    return tuple(float(v) for v in values)


def image_concepts(rec: Mapping[str, Any], class_name: str | None, image_size: tuple[int, int], transform: Any,
                   input_hw: tuple[int, int], size: tuple[int, int]
                   ) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    """One image's concepts as (name, (H,W) bool mask at ``size``), and the problems met (a mask
    missing or of another size: that mask is skipped)."""
    out: list[tuple[str, torch.Tensor]] = []
    problems: list[str] = []

    def load(path: str) -> torch.Tensor | None:
        try:
            return resize_mask(input_mask(path, image_size, transform, input_hw), size)
        except (ValueError, FileNotFoundError) as err:
            problems.append(str(err))
            return None

    def box(b: Sequence[float]) -> torch.Tensor | None:
        moved = input_box(b, image_size, transform, input_hw)
        return None if moved is None else box_raster(moved, input_hw, size)

    obj_box = _box_of(rec)
    obj = load(str(rec["mask"])) if rec.get("mask") else None
    if obj is None and obj_box is not None:
        obj = box(obj_box)
    if class_name is not None and obj is not None:
        out.append((class_name, obj))
    frags = [m for m in (box(b) for b in parse_boxes(rec.get("fragment_boxes"))) if m is not None]
    if frags:
        out.append((FRAGMENT, torch.stack(frags).any(0)))
    for name, path in parse_concepts(rec.get("concepts")):
        m = load(path)
        if m is not None:
            out.append((name, m))
    inside = box(obj_box) if obj_box is not None else obj
    if inside is not None:
        covered = torch.stack([inside, *frags]).any(0)
        out.append((BACKGROUND, ~covered))
    return merge_duplicates(out), problems


def stack_slots(per_image: Sequence[Sequence[tuple[str, torch.Tensor]]], index: Mapping[str, int],
                size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad images' concept lists into (B,S,H*W) bool slots and (B,S) concept indices (-1 = empty)."""
    slots = max((len(c) for c in per_image), default=0) or 1
    masks = torch.zeros(len(per_image), slots, size[0] * size[1], dtype=torch.bool)
    ids = torch.full((len(per_image), slots), -1, dtype=torch.int64)
    for i, items in enumerate(per_image):
        for j, (name, m) in enumerate(items):
            masks[i, j] = m.reshape(-1)
            ids[i, j] = index[name]
    return masks, ids


def merge_duplicates(items: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """One mask per concept name (a union), so no pixel counts twice for a concept in one image."""
    merged: dict[str, torch.Tensor] = {}
    for name, m in items:
        merged[name] = merged[name] | m if name in merged else m
    return list(merged.items())


def iou_size(input_hw: tuple[int, int], resolution: int | None) -> tuple[int, int]:
    """The (H,W) at which IoU is computed: the input's size, its longer side scaled down to
    ``resolution`` when that is smaller (null = the input's size)."""
    h, w = input_hw
    if resolution is None or max(h, w) <= resolution:
        return int(h), int(w)
    s = resolution / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))

