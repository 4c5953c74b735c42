"""Pictures, in one home: the model's input un-normalised, maps coloured and laid over images,
panels, grids, receptive-field crops, strips of maps, and PNG reading and writing.

Every stage that draws goes through here, so one picture means one thing everywhere: one
un-normalisation, one colormap lookup, one display scaling. Downscaling antialiases (a 224-pixel
input shown at 128 would otherwise alias); enlarging by 2x or more is nearest-neighbour, so a small
digit's pixels stay visible as pixels.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid, save_image

from pipeline.data.images import images_to_tensor
from pipeline.methods.receptive import receptive_field, unit_box
from pipeline.models import ModelBundle

CROP_SIZE = 64
SIGNED_QUANTILE = 0.995  # a signed picture's scale: this quantile of its magnitude

Box = Sequence[float]  # (x0, y0, x1, y1) in pixels, x1 and y1 exclusive


def unnormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo a (C,) mean/std normalisation of (..., C, H, W) tensors, clamped to [0, 1]."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x * s + m).clamp(0, 1)


def as_rgb(t: torch.Tensor) -> torch.Tensor:
    """(..., 1 or 3, H, W) -> (..., 3, H, W): grayscale repeated into three channels."""
    return t.expand(*t.shape[:-3], 3, *t.shape[-2:]) if t.shape[-3] == 1 else t


def model_view(model: ModelBundle, x: torch.Tensor) -> torch.Tensor:
    """The model's input tensors (..., C, H, W) as the RGB pictures in [0, 1] it sees."""
    return as_rgb(unnormalize(x, model.mean, model.std))


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W) or (H, W, 3) uint8."""
    arr = np.round(t.detach().float().clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
    return arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)


def display_image(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """One normalised model input (C, H, W) back as an RGB uint8 (H, W, 3) picture."""
    return to_uint8(as_rgb(unnormalize(x.detach().float().cpu(), mean, std)))


def save_png(t: torch.Tensor, path: Path) -> None:
    """Save a (C, H, W) picture in [0, 1] as a grayscale or RGB PNG."""
    Image.fromarray(to_uint8(t)).save(path)


def load_png(path: Path) -> torch.Tensor:
    """A PNG as a (C, H, W) float tensor in [0, 1] (1 channel for grayscale)."""
    with Image.open(path) as im:
        arr = np.asarray(im).astype(np.float32) / 255.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def resize(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) pictures bilinearly to ``size``, antialiased when shrinking."""
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)


def colorize(values: np.ndarray, cmap: str) -> np.ndarray:
    """Values in [0, 1] (H, W) through matplotlib colormap ``cmap``: float RGB (H, W, 3)."""
    return matplotlib.colormaps[cmap](np.nan_to_num(values))[..., :3]


def display_values(raw_map: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """A map scaled to [0, 1] for display: negative values clipped to 0 (evidence for the target
    shows, evidence against is not drawn), then stretched from the map's minimum to its
    ``percentile`` (so a few extreme pixels, as in gradient saliency, do not leave the rest
    invisible), or to its max when that is no higher. All zeros for a constant map."""
    v = np.clip(np.nan_to_num(np.asarray(raw_map, dtype=np.float32)), 0, None)
    if not v.size:
        return v
    lo, top = float(v.min()), float(np.percentile(v, percentile))
    if top <= lo:
        top = float(v.max())
    if top <= lo:
        return np.zeros_like(v)
    return np.clip((v - lo) / (top - lo), 0, 1)


def _resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a float map to ``size`` = (width, height) bilinearly."""
    if values.shape[::-1] == size:
        return values
    return np.asarray(Image.fromarray(values.astype(np.float32), mode="F").resize(size, Image.BILINEAR))


def overlay(image: np.ndarray, raw_map: np.ndarray, cmap: str = "jet", alpha: float = 0.5) -> Image.Image:
    """The map (see :func:`display_values`) through colormap ``cmap`` blended over ``image`` with
    opacity ``alpha`` times the map's value, so empty regions show the image unchanged."""
    h, w = image.shape[:2]
    values = _resize_map(display_values(raw_map), (w, h))
    weight = (alpha * values)[..., None]
    blended = (1 - weight) * (image.astype(np.float32) / 255.0) + weight * colorize(values, cmap)
    return Image.fromarray(np.round(np.clip(blended, 0, 1) * 255).astype(np.uint8), "RGB")


def outline(picture: Image.Image, mask: np.ndarray, colour: tuple[int, int, int] = (0, 255, 0)) -> Image.Image:
    """``picture`` with the edge pixels of boolean ``mask`` (any resolution) drawn in ``colour``:
    the edge is found at the mask's resolution, then scaled up nearest-neighbour."""
    padded = np.pad(mask, 1)
    edge = mask & ~(padded[2:, 1:-1] & padded[:-2, 1:-1] & padded[1:-1, 2:] & padded[1:-1, :-2])
    big = np.asarray(Image.fromarray(edge.astype(np.uint8) * 255).resize(picture.size, Image.NEAREST)) > 0
    arr = np.asarray(picture.convert("RGB")).copy()
    arr[big] = colour
    return Image.fromarray(arr)


def map_strip(maps: np.ndarray, cmap: str = "viridis", tile: int = 64, gap: int = 2) -> Image.Image:
    """Maps (N, H, W) side by side, each scaled to its own min..max and coloured."""
    n, h, _ = maps.shape
    canvas = Image.new("RGB", (n * tile + (n - 1) * gap, tile), "white")
    for i, m in enumerate(maps):
        lo, hi = float(np.nanmin(m)), float(np.nanmax(m))
        v = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
        rgb = (colorize(v, cmap) * 255).astype(np.uint8)
        canvas.paste(Image.fromarray(rgb).resize((tile, tile), Image.NEAREST if h <= tile else Image.BILINEAR),
                     (i * (tile + gap), 0))
    return canvas


@dataclass
class Tile:
    """One picture of a panel with its title and boxes to outline (colour name, box)."""

    title: str
    image: Image.Image
    boxes: list[tuple[str, Box]] = field(default_factory=list)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def panel(tiles: Sequence[Tile], header: str = "", tile_size: int = 192, pad: int = 6) -> Image.Image:
    """A side-by-side panel: each tile scaled so its longer side is ``tile_size`` (pixel-exact
    nearest-neighbour when enlarging by 2x or more), its title above it, ``header`` on top."""
    font = _font(max(10, tile_size // 14))
    line = font.getbbox("Ag")[3] + 4
    scaled = []
    for t in tiles:
        w, h = t.image.size
        f = tile_size / max(w, h)
        resample = Image.NEAREST if f >= 2 else Image.BILINEAR
        img = t.image.convert("RGB").resize((max(1, round(w * f)), max(1, round(h * f))), resample)
        draw = ImageDraw.Draw(img)
        for colour, (x0, y0, x1, y1) in t.boxes:
            draw.rectangle([x0 * f, y0 * f, x1 * f - 1, y1 * f - 1], outline=colour, width=2)
        scaled.append((t.title, img))
    top = (line + pad) if header else 0
    width = pad + sum(img.width + pad for _, img in scaled)
    height = top + line + pad + max(img.height for _, img in scaled) + pad
    canvas = Image.new("RGB", (max(width, 1), height), "white")
    draw = ImageDraw.Draw(canvas)
    if header:
        draw.text((pad, pad), header, fill="black", font=font)
    x = pad
    for title, img in scaled:
        text = title
        while len(text) > 1 and draw.textlength(text, font=font) > img.width:
            text = text[:-1]
        if text != title:
            text = text[:-1] + "…"
        draw.text((x, top + pad // 2), text, fill="black", font=font)
        canvas.paste(img, (x, top + line + pad // 2))
        x += img.width + pad
    return canvas


def grid(pictures: list[torch.Tensor], nrow: int) -> torch.Tensor:
    """Pictures (C, H, W) in [0, 1] side by side, white gaps; grayscale is shown as RGB. Smaller
    pictures are enlarged nearest-neighbour to the largest one's size."""
    size = max(p.shape[1] for p in pictures), max(p.shape[2] for p in pictures)
    same = [p if tuple(p.shape[1:]) == size else F.interpolate(p[None], size=size, mode="nearest")[0]
            for p in pictures]
    return make_grid(torch.stack([as_rgb(p) for p in same]), nrow=nrow, padding=2, pad_value=1.0)


def side_by_side(left: torch.Tensor, right: torch.Tensor, gap: int = 8) -> torch.Tensor:
    """Two grids next to each other, top-aligned, on white."""
    h = max(left.shape[1], right.shape[1])
    out = torch.ones(3, h, left.shape[2] + gap + right.shape[2])
    out[:, :left.shape[1], :left.shape[2]] = left
    out[:, :right.shape[1], left.shape[2] + gap:] = right
    return out


def signed_patch(picture: torch.Tensor, image: torch.Tensor, box: tuple[int, int, int, int],
                 min_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A signed picture (a deconvnet projection) and its image cropped to ``box``, for display: the
    picture centred on grey (0.5 = zero) and scaled by the ``SIGNED_QUANTILE`` of its magnitude (a
    few peak pixels would otherwise leave the rest grey), both enlarged (nearest) to ``min_size``."""
    x0, y0, x1, y1 = box
    proj = picture[:, y0:y1, x0:x1]
    top = float(torch.quantile(proj.abs().flatten().float(), SIGNED_QUANTILE)) if proj.numel() else 0.0
    top = top if top > 0 else float(proj.abs().max()) if proj.numel() else 0.0
    proj = proj / (2 * top) + 0.5 if top > 0 else torch.full_like(proj, 0.5)
    crop = image[:, y0:y1, x0:x1]
    factor = math.ceil(min_size / max(proj.shape[1:])) if max(proj.shape[1:]) < min_size else 1
    if factor > 1:
        proj = F.interpolate(proj[None], scale_factor=factor, mode="nearest")[0]
        crop = F.interpolate(crop[None], scale_factor=factor, mode="nearest")[0]
    return proj.clamp(0, 1), crop.clamp(0, 1)


def rf_crops(model: ModelBundle, views: torch.Tensor, layer: str, ys: np.ndarray, xs: np.ndarray,
             hw: tuple[int, int], size: int = CROP_SIZE) -> torch.Tensor:
    """Receptive-field crops of ``views`` (N,3,H,W) around unit (y, x) of ``layer``, resized to ``size``."""
    field_ = receptive_field(model.module, layer, model.input_shape)
    out = []
    for img, y, x in zip(views, ys, xs):
        x0, y0, x1, y1 = unit_box(int(y) * hw[1] + int(x), hw, tuple(img.shape[-2:]), field_)
        out.append(resize(img[None, :, y0:y1, x0:x1], (size, size))[0])
    return torch.stack(out)


def save_topk_grid(model: ModelBundle, paths: list[str], layer: str, positions: pd.DataFrame | None,
                   hw: tuple[int, int] | None, out: Path) -> None:
    """Images in one row and, when ``positions`` (columns y, x) are given, their receptive-field
    crops around those units of ``layer`` in a second row (Zeiler & Fergus's top-9 patches)."""
    unique = list(dict.fromkeys(paths))  # the neurons query shows one image k times: decode it once
    where = {p: i for i, p in enumerate(unique)}
    views = model_view(model, images_to_tensor(unique, model.transform))[[where[p] for p in paths]]
    side = CROP_SIZE * 2
    tiles = [resize(views, (side, side))]
    if positions is not None and hw is not None:
        tiles.append(rf_crops(model, views, layer, positions["y"].to_numpy(), positions["x"].to_numpy(), hw, side))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(torch.cat(tiles), nrow=len(paths), padding=4, pad_value=1.0), out)


def safe_name(text: str) -> str:
    """A file-name-safe version of a layer or class name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "layer"
