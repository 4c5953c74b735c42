"""Network Dissection results inside an activation store folder, and the cache of layer maps it reads.

Per dissected layer, ``<store root>/.meta/<layer dir>/dissect/`` holds::

    iou.parquet      layer (str), unit (int), concept (str), iou (float), rank (int, 1 = the unit's best)
    units.parquet    unit, label (None when the best IoU is at or below the cut), iou (best), concept
                     (best, even under the cut), purity, top_class, selectivity
    manifest.json    the summary (layer, units, labelled, unique_detectors, cut, quantile, images) and
                     the result's key; written last, so a folder without it is not a result

Both tables are plain Parquet, so DuckDB reads them with no project code:
``SELECT * FROM read_parquet('<store>/.meta/<layer>/dissect/iou.parquet') WHERE rank = 1``.

The map cache (``MapCache``) keeps each image's layer output (float16, layer resolution), keyed by
image id, in parts under ``<cache>/dissect/<model key>/v<MAP_VERSION>/<layer dir>/``: a re-run with more images
forwards only the new ones, and thresholds and IoUs are recomputed from the cached maps.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.cache import atomic_write_json, read_manifest
from pipeline.errors import PipelineError, suggest
from pipeline.store.layout import layer_dirname, meta_dir, tmp_path, write_parquet_atomic
from pipeline.store.store import ActivationStore

FOLDER = "dissect"
IOU_FILE = "iou.parquet"
UNITS_FILE = "units.parquet"
MAP_VERSION = 2  # bumped when a map cache part's files change (2: block maxima instead of coarse counts)
SUMMARY_KEYS = ("layer", "units", "labelled", "unique_detectors", "cut", "quantile", "images")


def dissect_dir(store: ActivationStore, layer: str) -> Path:
    """The folder of ``layer``'s dissection inside the store (``.meta/<layer dir>/dissect``)."""
    return meta_dir(store.root, layer) / FOLDER


def _manifest(store: ActivationStore, layer: str) -> dict[str, Any] | None:
    return read_manifest(dissect_dir(store, layer))


def read_dissection(store: ActivationStore, layer: str) -> pd.DataFrame | None:
    """The full IoU table of ``layer``: columns layer (str), unit (int), concept (str), iou (float),
    rank (int, 1 = the unit's best concept), sorted by unit then rank; None when not dissected."""
    if _manifest(store, layer) is None:
        return None
    return pd.read_parquet(dissect_dir(store, layer) / IOU_FILE)


def read_unit_labels(store: ActivationStore, layer: str) -> pd.DataFrame | None:
    """One row per unit of ``layer`` (labelled or not): unit (int), label (str, or None when the best
    IoU is at or below the cut), iou (best IoU), concept (best concept, even under the cut; None only
    when the dataset has no concept at all), purity
    (share of the unit's top-k images whose label is the most common one), top_class (that class's
    name), selectivity ((mu_max - mu_rest) / (mu_max + mu_rest) over class means of the unit's spatial
    mean); None when not dissected."""
    if _manifest(store, layer) is None:
        return None
    df = pd.read_parquet(dissect_dir(store, layer) / UNITS_FILE)
    for col in ("label", "concept", "top_class"):
        df[col] = df[col].astype(object).where(df[col].notna(), None)
    return df


def read_dissect_summary(store: ActivationStore, layer: str) -> dict[str, Any] | None:
    """``{"layer", "units", "labelled", "unique_detectors", "cut", "quantile", "images"}`` of ``layer``'s
    dissection (labelled = units whose best IoU is above the cut; unique_detectors = distinct concepts
    among their labels); None when not dissected."""
    m = _manifest(store, layer)
    return None if m is None else {k: m[k] for k in SUMMARY_KEYS}


def concept_units(store: ActivationStore, layers: Sequence[str], concept: str) -> pd.DataFrame:
    """Units of the dissected ``layers`` ranked by IoU with ``concept``: layer, unit, iou, rank (the
    concept's rank among the unit's concepts), label (the unit's own label, None when unlabelled).
    A concept no dissected layer knows is a PipelineError naming close matches."""
    frames, known = [], set()
    for layer in layers:
        table = read_dissection(store, layer)
        if table is None:
            continue
        known.update(table["concept"].astype(str))
        hit = table[table["concept"] == concept][["layer", "unit", "iou", "rank"]]
        labels = read_unit_labels(store, layer)
        frames.append(hit.merge(labels[["unit", "label"]], on="unit"))
    if not frames:
        raise PipelineError(f"no dissected layer in the store at {store.root}: "
                            "run `python -m pipeline stage=dissect` first.")
    if concept not in known:
        raise PipelineError(f"unknown concept {concept!r}.{suggest(concept, sorted(known))} "
                            f"Concepts: {', '.join(sorted(known)[:20])}.")
    out = pd.concat(frames, ignore_index=True).sort_values(["iou", "layer", "unit"], ascending=[False, True, True])
    out["label"] = out["label"].astype(object).where(out["label"].notna(), None)
    return out.reset_index(drop=True)


def dissection_key(store: ActivationStore, layer: str) -> str | None:
    """The key the stored dissection of ``layer`` was computed for; None when there is none."""
    m = _manifest(store, layer)
    return None if m is None else str(m.get("key"))


def write_dissection(store: ActivationStore, layer: str, iou: pd.DataFrame, units: pd.DataFrame,
                     summary: dict[str, Any], key: str) -> None:
    """Write ``layer``'s tables atomically, the manifest (summary + key) last."""
    folder = dissect_dir(store, layer)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").unlink(missing_ok=True)  # the old tables stop being a result first
    iou_t = pa.table({"layer": pa.array(iou["layer"].astype(str).tolist(), pa.string()),
                      "unit": pa.array(iou["unit"].to_numpy(np.int64)),
                      "concept": pa.array(iou["concept"].astype(str).tolist(), pa.string()),
                      "iou": pa.array(iou["iou"].to_numpy(np.float64)),
                      "rank": pa.array(iou["rank"].to_numpy(np.int64))})
    units_t = pa.table({"unit": pa.array(units["unit"].to_numpy(np.int64)),
                        "label": pa.array([None if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v))
                                           else str(v) for v in units["label"]], pa.string()),
                        "iou": pa.array(units["iou"].to_numpy(np.float64)),
                        "concept": pa.array([None if v is None else str(v) for v in units["concept"]], pa.string()),
                        "purity": pa.array(units["purity"].to_numpy(np.float64)),
                        "top_class": pa.array([None if v is None else str(v) for v in units["top_class"]], pa.string()),
                        "selectivity": pa.array(units["selectivity"].to_numpy(np.float64))})
    write_parquet_atomic(iou_t, folder / IOU_FILE)
    write_parquet_atomic(units_t, folder / UNITS_FILE)
    atomic_write_json(folder / "manifest.json", {**{k: summary[k] for k in SUMMARY_KEYS}, "key": key})


# ----------------------------------------------------------------------------- map cache ---

class MapCache:
    """Per-image layer maps (float16, (C,h,w) at layer resolution) of one model and layer, on disk.

    A part ``part-<uuid>`` holds ``.npy`` maps (n,C,h,w), ``.max.npy`` (n,C) float16 spatial maxima,
    ``.mean.npy`` (n,C) float32 spatial means, ``.block.npy`` (n,C,nb) float16 maxima of spatial
    blocks (the caller's), and ``.ids.json`` (its image ids), written last: a part without its
    ids file is not a part, and is removed. Reads map a part, copy the rows asked for and unmap it,
    so memory does not grow with the number of images; the maxima let a reader fetch only the maps
    it needs.
    """


    def __init__(self, root: Path, model_key: str, layer: str) -> None:
        self.folder = Path(root) / FOLDER / model_key / f"v{MAP_VERSION}" / layer_dirname(layer)
        self._index: dict[str, tuple[int, int]] | None = None
        self._stems: list[Path] = []
        self._headers: dict[tuple[int, str], tuple[str, np.dtype, tuple[int, ...], int]] = {}

    def _parts(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        stems = sorted(p.with_name(p.name[: -len(".ids.json")]) for p in self.folder.glob("part-*.ids.json"))
        listed = {p.name for p in stems}
        for f in self.folder.glob("part-*"):  # the arrays of a part whose writer died before its ids file
            if f.name.split(".")[0] not in listed:
                f.unlink(missing_ok=True)
        return stems

    def index(self) -> dict[str, tuple[int, int]]:
        """image id -> (part number, row in it), over every complete part (a later part wins)."""
        if self._index is None:
            self._stems = self._parts()
            self._headers = {}
            index: dict[str, tuple[int, int]] = {}
            for p, stem in enumerate(self._stems):
                for i, image_id in enumerate(json.loads(stem.with_name(stem.name + ".ids.json").read_text())):
                    index[image_id] = (p, i)
            self._index = index
        return self._index

    def write(self, image_ids: Sequence[str], maps: np.ndarray, maxima: np.ndarray, means: np.ndarray,
              blocks: np.ndarray) -> None:
        """Add one part: ``maps`` (n,C,h,w) of ``image_ids`` (kept as float16), their (n,C) spatial
        ``maxima`` (kept as float16, like the maps) and ``means``, and their (n,C,nb) block maxima."""
        self.folder.mkdir(parents=True, exist_ok=True)
        arrays = {"npy": np.ascontiguousarray(maps, dtype=np.float16), "max.npy": np.asarray(maxima, np.float16),
                  "mean.npy": np.asarray(means, np.float32), "block.npy": np.asarray(blocks, np.float16)}
        stem = self.folder / f"part-{uuid.uuid4().hex}"
        for suffix, arr in arrays.items():
            path = stem.with_name(f"{stem.name}.{suffix}")
            tmp = tmp_path(path)
            with open(tmp, "wb") as f:
                np.save(f, arr)
            os.replace(tmp, path)
        ids_path = stem.with_name(stem.name + ".ids.json")
        tmp = tmp_path(ids_path)
        tmp.write_text(json.dumps(list(image_ids)))
        os.replace(tmp, ids_path)
        self._index = None

    def _header(self, part: int, suffix: str) -> tuple[str, np.dtype, tuple[int, ...], int]:
        """(path, dtype, shape, data offset) of a part's .npy file, parsed once (thousands of reads per pass)."""
        if (part, suffix) not in self._headers:
            path = str(self._stems[part]) + "." + suffix
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0(f))  # C order: written by np.save
                self._headers[(part, suffix)] = (path, dtype, shape, f.tell())
        return self._headers[(part, suffix)]

    def _array(self, part: int, suffix: str) -> np.ndarray:
        """A part's array, memory-mapped. Not kept open: pages read through a mapping count in the
        process's resident memory until it is unmapped, so each read maps, copies out and unmaps."""
        path, dtype, shape, offset = self._header(part, suffix)
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)

    def _where(self, image_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        index = self.index()
        where = np.array([index[i] for i in image_ids], dtype=np.int64).reshape(-1, 2)
        return where[:, 0], where[:, 1]

    def _rows(self, image_ids: Sequence[str], suffix: str) -> np.ndarray:
        """The rows of ``image_ids`` of every part's ``suffix`` array, in that order."""
        parts, rows = self._where(image_ids)
        first = self._array(int(parts[0]), suffix)
        out = np.empty((len(rows), *first.shape[1:]), first.dtype)
        for p in np.unique(parts):
            pos = np.flatnonzero(parts == p)
            out[pos] = self._array(int(p), suffix)[rows[pos]]
        return out

    def stats(self, image_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(max (n,C) float16, mean (n,C) float32) of ``image_ids``, in that order."""
        return self._rows(image_ids, "max.npy"), self._rows(image_ids, "mean.npy")

    def blocks(self, image_ids: Sequence[str]) -> np.ndarray:
        """(n,C,nb) float16 block maxima of ``image_ids``, in that order."""
        return self._rows(image_ids, "block.npy")

    def maps(self, image_ids: Sequence[str], images: np.ndarray, units: np.ndarray | None = None) -> np.ndarray:
        """float16 maps of the pairs (``image_ids[images[j]]``, ``units[j]``) as (n,h,w); with
        ``units`` None, every unit of the images as (n,C,h,w)."""
        parts, rows = self._where(image_ids)
        parts, rows = parts[images], rows[images]
        if not len(parts):
            return np.empty((0, 1, 1), np.float16)
        shape = self._header(int(parts[0]), "npy")[2]
        out = np.empty((len(rows), *(shape[1:] if units is None else shape[2:])), np.float16)
        for p in np.unique(parts):
            pos = np.flatnonzero(parts == p)
            arr = self._array(int(p), "npy")
            if units is None:
                out[pos] = np.take(arr, rows[pos], axis=0)
            else:  # whole (h,w) rows of the (n*C, h*w) view: a third faster than indexing by (image, unit)
                flat = arr.reshape(arr.shape[0] * arr.shape[1], -1)
                out[pos] = np.take(flat, rows[pos] * arr.shape[1] + units[pos], axis=0).reshape(len(pos), *shape[2:])
        return out
