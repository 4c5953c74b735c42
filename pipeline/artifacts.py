"""Per-image explanation artifacts in the cache: keys, reading and writing (the pictures they hold
are drawn by :mod:`pipeline.pictures`).

An artifact is one method's map for one image: ``map.npy`` (float32, the raw map), ``overlay.png``
(the map through a matplotlib colormap over the image) and ``meta.json``, plus optional extra
arrays, in ``cache/artifacts/<method>/<key[:2]>/<key>/`` (manifest written last). The key is
:func:`artifact_key`: method, version, the parameters that change the map, model key and image id.
Shared by the stages that write per-image maps (explain, visualize).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache import Cache, atomic_write_json, make_key
from pipeline.pictures import overlay, save_png

MAP_FILE = "map.npy"
OVERLAY_FILE = "overlay.png"
PATCH_FILE = "patch.png"
META_FILE = "meta.json"
DISPLAY_VERSION = 1  # bump when the overlay's scaling changes


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


def write_picture(cache: Cache, method: str, key: str, raw: np.ndarray, picture: torch.Tensor,
                  meta: dict[str, Any], patch: torch.Tensor | None = None) -> Artifact:
    """Write an artifact whose ``overlay.png`` is a picture in its own right (an ascent image, a
    deconvnet projection) rather than a heat map over an image; same layout as
    :func:`write_artifact`: map.npy, overlay.png, meta.json (+ patch.png)."""
    raw = np.asarray(raw, dtype=np.float32)
    meta = {**meta, "method": method, "key": key, "shape": list(raw.shape), "extras": []}
    pictures = {OVERLAY_FILE: lambda path: save_png(picture, path)}
    if patch is not None:
        pictures[PATCH_FILE] = lambda path: save_png(patch, path)
    return publish_artifact(cache, method, key, raw, meta, pictures)
