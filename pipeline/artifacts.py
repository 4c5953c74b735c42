"""Per-image explanation artifacts in the cache, their overlays, and side-by-side panels.

An artifact is one method's map for one image: ``map.npy`` (float32, the raw map), ``overlay.png``
(the map through a matplotlib colormap over the image) and ``meta.json``, plus optional extra
arrays, in ``cache/artifacts/<method>/<key[:2]>/<key>/`` (manifest written last). The key is
:func:`artifact_key`: method, version, the parameters that change the map, model key and image id.
Shared by the stages that write per-image maps (explain, visualize).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pipeline.cache import Cache, atomic_write_json, make_key

MAP_FILE = "map.npy"
OVERLAY_FILE = "overlay.png"
META_FILE = "meta.json"
DISPLAY_VERSION = 1  # bump when the overlay's scaling changes

Box = Sequence[float]  # (x0, y0, x1, y1) in pixels, x1 and y1 exclusive


def artifact_kind(method: str) -> str:
    """Cache kind of a method's artifacts; also the name its hits and misses are counted under."""
    return f"artifacts/{method}"


def artifact_key(method: str, version: int, params: dict[str, Any], model_key: str, image_id: str,
                 display: dict[str, Any] | None = None) -> str:
    """Content key of one artifact: what is computed, its result-changing parameters, its inputs and
    the overlay's ``display`` settings. Without ``display`` it names the map alone (for results
    derived from the map, such as its scores, which a new colormap must not invalidate)."""
    parts: dict[str, Any] = dict(kind="artifact", method=method, version=version, params=params, model=model_key,
                                 image=image_id)
    if display is not None:
        parts["display"] = display
    return make_key(**parts)


def display_settings(cmap: str, alpha: float) -> dict[str, Any]:
    """The overlay settings that go into an artifact's key (with the display scaling's version)."""
    return {"cmap": cmap, "alpha": float(alpha), "version": DISPLAY_VERSION}


@dataclass
class Artifact:
    """One method's map for one image, read from or just written to the cache."""

    method: str
    key: str
    folder: Path
    map: np.ndarray
    meta: dict[str, Any]
    cached: bool
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def map_path(self) -> Path:
        return self.folder / MAP_FILE

    @property
    def overlay_path(self) -> Path:
        return self.folder / OVERLAY_FILE

    def extra(self, name: str) -> np.ndarray:
        """An extra array saved beside the map (``<name>.npy``), loaded on first use."""
        if name not in self.extras:
            self.extras[name] = np.load(self.folder / f"{name}.npy")
        return self.extras[name]


def read_artifact(cache: Cache, method: str, key: str) -> Artifact | None:
    """The cached artifact (a hit), or None (a miss); both are counted under :func:`artifact_kind`."""
    folder = cache.get(artifact_kind(method), key, fanout=True)
    if folder is None:
        return None
    meta = json.loads((folder / META_FILE).read_text())
    return Artifact(method, key, folder, np.load(folder / MAP_FILE), meta, cached=True)


def publish_artifact(cache: Cache, method: str, key: str, raw_map: np.ndarray, meta: dict[str, Any],
                     pictures: dict[str, Callable[[Path], None]], extras: dict[str, np.ndarray] | None = None,
                     ) -> Artifact:
    """Write map.npy, extras, the pictures (file name -> writer) and meta.json into the artifact's
    cache folder, manifest last; the one writer behind every kind of artifact."""
    extras = extras or {}
    kind = artifact_kind(method)
    with cache.write(kind, key, {"method": method}, fanout=True) as tmp:
        np.save(tmp / MAP_FILE, raw_map)
        for name, arr in extras.items():
            np.save(tmp / f"{name}.npy", arr)
        for name, draw in pictures.items():
            draw(tmp / name)
        atomic_write_json(tmp / META_FILE, meta)
    return Artifact(method, key, cache.path(kind, key, fanout=True), raw_map, meta, cached=False, extras=extras)


def write_artifact(cache: Cache, method: str, key: str, raw_map: np.ndarray, image: np.ndarray,
                   meta: dict[str, Any], extras: dict[str, np.ndarray] | None = None,
                   cmap: str = "jet", alpha: float = 0.5) -> Artifact:
    """Write a heat map with its overlay over ``image``, meta and extras (manifest last)."""
    raw_map = np.asarray(raw_map, dtype=np.float32)
    extras = {k: np.asarray(v, dtype=np.float32) for k, v in (extras or {}).items()}
    meta = {**meta, "method": method, "key": key, "shape": list(raw_map.shape),
            "min": float(raw_map.min()), "max": float(raw_map.max()), "extras": sorted(extras)}
    return publish_artifact(cache, method, key, raw_map, meta,
                            {OVERLAY_FILE: lambda path: overlay(image, raw_map, cmap, alpha).save(path)}, extras)


def cached_artifact(cache: Cache, method: str, key: str,
                    compute: Callable[[], tuple[np.ndarray, dict[str, Any], dict[str, np.ndarray]]],
                    image: np.ndarray, cmap: str = "jet", alpha: float = 0.5) -> Artifact:
    """Read the artifact on a hit; on a miss call ``compute() -> (map, meta, extras)`` and write it."""
    hit = read_artifact(cache, method, key)
    if hit is not None:
        return hit
    raw_map, meta, extras = compute()
    return write_artifact(cache, method, key, raw_map, image, meta, extras, cmap, alpha)


def display_image(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The model's input (C,H,W), normalized, back as an RGB uint8 (H,W,3) picture."""
    t = x.detach().float().cpu()
    m = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    arr = (t * s + m).clamp(0, 1).permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.round(arr * 255).astype(np.uint8)


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
    colours = matplotlib.colormaps[cmap](values)[..., :3]
    weight = (alpha * values)[..., None]
    blended = (1 - weight) * (image.astype(np.float32) / 255.0) + weight * colours
    return Image.fromarray(np.round(np.clip(blended, 0, 1) * 255).astype(np.uint8), "RGB")


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
