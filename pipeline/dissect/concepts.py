"""Concept masks from a dataset's own annotations, in the model's input frame at the IoU resolution
(numpy bool arrays: a few small array writes per image, no per-image torch calls).

Per image: its class ("3", from the object mask, or the box when there is no usable mask), each
fragment box (concept "fragment", recorded by clutter digits), each extra mask the manifest's
``concepts`` column names (``name=mask.png;name2=other.png``), and "background" (outside the object
and every fragment box; only for images with a box or a mask).
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from pipeline.selection import clip_box, geometric_steps, input_box, input_mask, open_mask

FRAGMENT = "fragment"
BACKGROUND = "background"
MAX_SLOTS = 40  # concepts of one image, each a bit of its pixels' slot masks
PNG = b"\x89PNG\r\n\x1a\n"


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of an image file: from a PNG's header directly (a tenth of the time PIL takes
    to open it), else from PIL."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] == PNG and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24])
    with Image.open(path) as im:
        return im.size


def same_frame(image_size: tuple[int, int], transform: Any, input_hw: tuple[int, int]) -> bool:
    """Whether ``transform`` leaves an image of ``image_size`` (width, height) where it is: already the
    input's size, and a box keeps its place through the Resize and CenterCrop steps. Its masks then
    need no resizing or cropping (which cost more than decoding them)."""
    w, h = image_size
    return ((h, w) == tuple(input_hw) and geometric_steps(transform) is not None
            and input_box((1.0, 1.0, 2.0, 2.0), image_size, transform, input_hw) == (1.0, 1.0, 2.0, 2.0))


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


def box_raster(box: Sequence[float], input_hw: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(H,W) bool at ``size``: the pixels whose centres fall in ``box`` (input-frame coordinates)."""
    sy, sx = input_hw[0] / size[0], input_hw[1] / size[1]
    x0, y0, x1, y1 = box
    # centre (i + 0.5) * s lies in [lo, hi)  <=>  ceil(lo / s - 0.5) <= i < ceil(hi / s - 0.5)
    r0, r1 = (min(size[0], max(0, math.ceil(v / sy - 0.5))) for v in (y0, y1))
    c0, c1 = (min(size[1], max(0, math.ceil(v / sx - 0.5))) for v in (x0, x1))
    out = np.zeros(size, dtype=bool)
    out[r0:r1, c0:c1] = True
    return out


@functools.lru_cache(maxsize=64)
def _nearest(n_in: int, n_out: int) -> np.ndarray:
    """The source index of each output index under ``F.interpolate(mode="nearest")`` (its own rounding)."""
    ramp = torch.arange(n_in, dtype=torch.float32)[None, None]
    return F.interpolate(ramp, size=n_out, mode="nearest")[0, 0].long().numpy()


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (H,W) bool mask at ``size`` (nearest neighbour, as ``F.interpolate``)."""
    if tuple(mask.shape) == tuple(size):
        return mask
    return mask[_nearest(mask.shape[0], size[0])][:, _nearest(mask.shape[1], size[1])]


def _box_of(rec: Mapping[str, Any]) -> tuple[float, float, float, float] | None:
    values = [rec.get(k) for k in ("box_x0", "box_y0", "box_x1", "box_y1")]
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        return None
    return tuple(float(v) for v in values)


def image_concepts(rec: Mapping[str, Any], class_name: str | None, image_size: tuple[int, int], transform: Any,
                   input_hw: tuple[int, int], size: tuple[int, int]
                   ) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    """One image's concepts as (name, (H,W) bool mask at ``size``), and the problems met (a mask
    missing or of another size: that mask is skipped)."""
    out: list[tuple[str, np.ndarray]] = []
    problems: list[str] = []
    same = same_frame(image_size, transform, input_hw)  # then masks and boxes stay as they are

    def load(path: str) -> np.ndarray | None:
        try:
            mask = (np.asarray(open_mask(path, image_size)) > 0 if same else
                    input_mask(path, image_size, transform, input_hw).numpy())
            return resize_mask(mask, size)
        except (ValueError, FileNotFoundError) as err:
            problems.append(str(err))
            return None

    def box(b: Sequence[float]) -> np.ndarray | None:
        moved = clip_box(b, image_size) if same else input_box(b, image_size, transform, input_hw)
        return None if moved is None else box_raster(moved, input_hw, size)

    obj_box = _box_of(rec)
    obj = load(str(rec["mask"])) if rec.get("mask") else None
    if obj is None and obj_box is not None:
        obj = box(obj_box)
    if class_name is not None and obj is not None:
        out.append((class_name, obj))
    frags = [m for m in (box(b) for b in parse_boxes(rec.get("fragment_boxes"))) if m is not None]
    if frags:
        out.append((FRAGMENT, np.logical_or.reduce(frags)))
    for name, path in parse_concepts(rec.get("concepts")):
        m = load(path)
        if m is not None:
            out.append((name, m))
    inside = box(obj_box) if obj_box is not None else obj
    if inside is not None:
        out.append((BACKGROUND, ~np.logical_or.reduce([inside, *frags])))
    return merge_duplicates(out), problems


def stack_slots(per_image: Sequence[Sequence[tuple[str, np.ndarray]]], index: Mapping[str, int],
                size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pack images' concept lists into (B,H*W) slot bits (bit j: the image's slot j covers the pixel;
    the smallest unsigned type that holds them) and (B,S) int64 concept indices of the slots (-1 = empty)."""
    slots = max((len(c) for c in per_image), default=0) or 1
    if slots > MAX_SLOTS:
        raise ValueError(f"an image has {slots} concepts; at most {MAX_SLOTS} are supported")
    dtype = next(d for d in (np.uint8, np.uint16, np.uint32, np.uint64) if np.iinfo(d).bits >= slots)
    bits = np.zeros((len(per_image), size[0] * size[1]), dtype=dtype)
    ids = np.full((len(per_image), slots), -1, dtype=np.int64)
    for i, items in enumerate(per_image):
        for j, (name, m) in enumerate(items):
            bits[i] |= m.reshape(-1).astype(dtype) << dtype(j)
            ids[i, j] = index[name]
    return bits, ids


def merge_duplicates(items: list[tuple[str, np.ndarray]]) -> list[tuple[str, np.ndarray]]:
    """One mask per concept name (a union), so no pixel counts twice for a concept in one image."""
    merged: dict[str, np.ndarray] = {}
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

