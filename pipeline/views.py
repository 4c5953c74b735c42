"""Pictures shared by stages: the model's view of images, receptive-field crops, top-k grids, PNG
reading and writing, grids of pictures, and pictures written as cached artifacts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import make_grid, save_image

from pipeline.artifacts import OVERLAY_FILE, Artifact, publish_artifact
from pipeline.cache import Cache

from pipeline.methods.receptive import receptive_field, unit_box
from pipeline.models import ModelBundle
from pipeline.runtime import images_to_tensor, model_view

CROP_SIZE = 64
PATCH_FILE = "patch.png"


def rf_crops(model: ModelBundle, views: torch.Tensor, layer: str, ys: np.ndarray, xs: np.ndarray,
             hw: tuple[int, int], size: int = CROP_SIZE) -> torch.Tensor:
    """Receptive-field crops of ``views`` (N,3,H,W) around unit (y, x) of ``layer``, resized to ``size``."""
    field = receptive_field(model.module, layer, model.input_shape)
    out = []
    for img, y, x in zip(views, ys, xs):
        x0, y0, x1, y1 = unit_box(int(y) * hw[1] + int(x), hw, tuple(img.shape[-2:]), field)
        out.append(F.interpolate(img[None, :, y0:y1, x0:x1], size=(size, size), mode="bilinear",
                                 align_corners=False)[0])
    return torch.stack(out)


def save_topk_grid(model: ModelBundle, paths: list[str], layer: str, positions: pd.DataFrame | None,
                   hw: tuple[int, int] | None, out: Path) -> None:
    """Images in one row and, when ``positions`` (columns y, x) are given, their receptive-field
    crops around those units of ``layer`` in a second row (Zeiler & Fergus's top-9 patches)."""
    unique = list(dict.fromkeys(paths))  # the neurons query shows one image k times: decode it once
    where = {p: i for i, p in enumerate(unique)}
    views = model_view(model, images_to_tensor(unique, model.transform))[[where[p] for p in paths]]
    side = CROP_SIZE * 2
    shown = F.interpolate(views, size=(side, side), mode="bilinear", align_corners=False)
    tiles = [shown]
    if positions is not None and hw is not None:
        c = rf_crops(model, views, layer, positions["y"].to_numpy(), positions["x"].to_numpy(), hw, side)
        tiles.append(c)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(torch.cat(tiles), nrow=len(paths), padding=4, pad_value=1.0), out)


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W) or (H, W, 3) uint8."""
    arr = np.round(t.detach().float().clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
    return arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)


def save_png(t: torch.Tensor, path: Path) -> None:
    """Save a (C, H, W) picture in [0, 1] as a grayscale or RGB PNG."""
    Image.fromarray(to_uint8(t)).save(path)


def load_png(path: Path) -> torch.Tensor:
    """A PNG as a (C, H, W) float tensor in [0, 1] (1 channel for grayscale)."""
    with Image.open(path) as im:
        arr = np.asarray(im).astype(np.float32) / 255.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def write_picture(cache: Cache, method: str, key: str, raw: np.ndarray, picture: torch.Tensor,
                  meta: dict[str, Any], patch: torch.Tensor | None = None) -> Artifact:
    """Write an artifact whose ``overlay.png`` is a picture in its own right (an ascent image, a
    deconvnet projection) rather than a heat map over an image, which ``pipeline.artifacts``'s
    heat-map writer does not draw; same layout: map.npy, overlay.png, meta.json (+ patch.png)."""
    raw = np.asarray(raw, dtype=np.float32)
    meta = {**meta, "method": method, "key": key, "shape": list(raw.shape), "extras": []}
    pictures = {OVERLAY_FILE: lambda path: save_png(picture, path)}
    if patch is not None:
        pictures[PATCH_FILE] = lambda path: save_png(patch, path)
    return publish_artifact(cache, method, key, raw, meta, pictures)


def grid(pictures: list[torch.Tensor], nrow: int) -> torch.Tensor:
    """Pictures (C, H, W) in [0, 1] side by side, white gaps; grayscale is shown as RGB."""
    size = max(p.shape[1] for p in pictures), max(p.shape[2] for p in pictures)
    same = [p if tuple(p.shape[1:]) == size else F.interpolate(p[None], size=size, mode="nearest")[0]
            for p in pictures]
    same = [p.expand(3, -1, -1) if p.shape[0] == 1 else p for p in same]
    return make_grid(torch.stack(same), nrow=nrow, padding=2, pad_value=1.0)


def side_by_side(left: torch.Tensor, right: torch.Tensor, gap: int = 8) -> torch.Tensor:
    """Two grids next to each other, top-aligned, on white."""
    h = max(left.shape[1], right.shape[1])
    out = torch.ones(3, h, left.shape[2] + gap + right.shape[2])
    out[:, :left.shape[1], :left.shape[2]] = left
    out[:, :right.shape[1], left.shape[2] + gap:] = right
    return out


def safe_name(text: str) -> str:
    """A file-name-safe version of a layer or class name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "layer"
