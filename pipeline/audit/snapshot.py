"""Audit snapshots: what the next audit compares against, one folder per audit.

Layout of ``<snapshots>/<timestamp>/``::

    manifest.json     created, model key, dataset, store generation, summary metrics (accuracy,
                      per-class accuracy, per-class localisation), regressions, accepted (written last)
    images.parquet    one row per file: path, image_id, label, split, prediction, confidence
    neurons.parquet   one row per (layer, channel): max (spatial max over every image), top (top-k image ids)
    thumbs.npz        image_id, thumbs (N, size*size uint8), size: reused for unchanged images
    reliance.parquet  image_id, method, class, thumb (16x16 map): the next audit's explanation drift
    units.parquet     layer, unit, label (None under the cut), concept, iou: the dissected units'
                      labels (stage=dissect), for the next audit's label changes

A snapshot is written into a hidden temporary folder and renamed into place, so a folder without
a manifest never appears under its final name. ``latest`` is the newest *accepted* snapshot: one
whose audit passed (or was not enforced), so a regression keeps failing until it is fixed.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache import atomic_write_json, read_manifest
from pipeline.errors import PipelineError

FORMAT = "audit-snapshot"
VERSION = 1


@dataclass
class Snapshot:
    """A loaded snapshot (thumbnails load on demand)."""

    path: Path
    manifest: dict[str, Any]
    images: pd.DataFrame
    neurons: pd.DataFrame

    def thumbs(self, size: int) -> dict[str, np.ndarray]:
        """image_id -> thumbnail, when the snapshot kept thumbnails of this size; else {}."""
        f = self.path / "thumbs.npz"
        if not f.exists():
            return {}
        with np.load(f) as z:
            if int(z["size"]) != size:
                return {}
            return dict(zip(z["image_id"].tolist(), z["thumbs"]))

    def reliance_maps(self) -> pd.DataFrame | None:
        """``image_id``, ``method``, ``class`` and ``thumb`` (256 float32) of the maps the audit's
        reliance section scored, or None when this snapshot has none."""
        f = self.path / "reliance.parquet"
        if not f.exists():
            return None
        df = pq.read_table(f).to_pandas()
        df["thumb"] = [np.asarray(t, np.float32) for t in df["thumb"]]
        return df

    def unit_labels(self) -> pd.DataFrame | None:
        """``layer``, ``unit``, ``label``, ``concept``, ``iou`` of the units dissected when this
        snapshot was taken, or None when none was."""
        f = self.path / "units.parquet"
        if not f.exists():
            return None
        df = pq.read_table(f).to_pandas()
        df["label"] = df["label"].astype(object).where(df["label"].notna(), None)
        return df


def _snapshot_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


def find_latest(root: Path) -> Path | None:
    """The newest accepted snapshot under ``root`` (by folder name, which is its creation time)."""
    for p in reversed(_snapshot_dirs(root)):
        m = read_manifest(p)
        if m and m.get("format") == FORMAT and m.get("accepted"):
            return p
    return None


def resolve(spec: Any, root: Path) -> Path | None:
    """The baseline folder: ``latest`` (None when there is none yet), a folder, or None for null/none."""
    if spec is None or str(spec).lower() in ("", "none", "null"):
        return None
    if str(spec) == "latest":
        return find_latest(root)
    path = Path(str(spec)).expanduser()
    m = read_manifest(path)
    if m is None or m.get("format") != FORMAT:
        found = ", ".join(p.name for p in _snapshot_dirs(root)[-5:]) or "none"
        raise PipelineError(f"audit.baseline={spec}: '{path}' is not an audit snapshot (no snapshot manifest). "
                            f"Use audit.baseline=latest, null, or one of the folders in {root} (newest: {found}).")
    return path


def load(path: Path) -> Snapshot:
    """Read a snapshot; an unreadable or other-version snapshot is a clear error."""
    m = read_manifest(path)
    if m is None or m.get("format") != FORMAT:
        raise PipelineError(f"'{path}' is not an audit snapshot. Use audit.baseline=latest or null.")
    if m.get("version") != VERSION:
        raise PipelineError(f"the audit snapshot '{path}' has format version {m.get('version')}, this audit reads "
                            f"version {VERSION}: run with audit.baseline=null once to start a new series.")
    images = pd.read_parquet(path / "images.parquet")
    for c in ("label", "prediction"):
        images[c] = images[c].astype("Int64")
    neurons = pq.read_table(path / "neurons.parquet").to_pandas()
    return Snapshot(path, m, images, neurons)


def save(root: Path, manifest: dict[str, Any], images: pd.DataFrame, neurons: pd.DataFrame,
         thumbs: tuple[np.ndarray, np.ndarray, int] | None, reliance: pd.DataFrame | None = None,
         units: pd.DataFrame | None = None) -> Path:
    """Write a new snapshot under ``root`` atomically; returns its folder."""
    root.mkdir(parents=True, exist_ok=True)
    name = dt.datetime.now().strftime("%Y-%m-%dT%H-%M-%S.%f")
    tmp = root / f".{name}.{os.getpid()}.tmp"
    tmp.mkdir()
    try:
        cols = ["path", "image_id", "label", "split", "prediction", "confidence"]
        images[cols].to_parquet(tmp / "images.parquet", index=False)
        table = pa.table({"layer": pa.array(neurons["layer"].astype(str).tolist(), pa.string()),
                          "channel": pa.array(neurons["channel"].to_numpy(np.int32)),
                          "max": pa.array(neurons["max"].to_numpy(np.float32)),
                          "top": pa.array([list(t) for t in neurons["top"]], pa.list_(pa.string()))})
        pq.write_table(table, tmp / "neurons.parquet", use_dictionary=True, compression="zstd")
        if thumbs is not None:
            ids, pixels, size = thumbs
            with open(tmp / "thumbs.npz", "wb") as f:
                np.savez_compressed(f, image_id=np.asarray(ids, dtype=str), thumbs=pixels, size=np.int64(size))
        if reliance is not None and len(reliance):
            pq.write_table(pa.table({
                "image_id": pa.array(reliance["image_id"].astype(str).tolist(), pa.string()),
                "method": pa.array(reliance["method"].astype(str).tolist(), pa.string()),
                "class": pa.array(reliance["class"].to_numpy(np.int64)),
                "thumb": pa.array([np.asarray(t, np.float32) for t in reliance["thumb"]], pa.list_(pa.float32()))}),
                tmp / "reliance.parquet", compression="zstd")
        if units is not None and len(units):
            pq.write_table(pa.table({
                "layer": pa.array(units["layer"].astype(str).tolist(), pa.string()),
                "unit": pa.array(units["unit"].to_numpy(np.int64)),
                "label": pa.array([v if isinstance(v, str) else None for v in units["label"]], pa.string()),
                "concept": pa.array(units["concept"].astype(str).tolist(), pa.string()),
                "iou": pa.array(units["iou"].to_numpy(np.float64))}), tmp / "units.parquet", compression="zstd")
        atomic_write_json(tmp / "manifest.json", {"format": FORMAT, "version": VERSION, "name": name, **manifest})
        final = root / name
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final

