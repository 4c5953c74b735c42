"""Reading one committed generation of a store: layers, images, top-K lookups and pooled vectors.

A :class:`StoreReader` holds the store manifest of one generation and caches what it has read
(the images table, open Parquet handles, top-K arrays); a commit replaces the reader, so no cache
outlives the generation it was read from. Every file read the stages need goes through here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.cache import read_manifest
from pipeline.errors import PipelineError, suggest
from pipeline.store import topk as tk
from pipeline.store.layout import EXTRACT_HINT, IMAGES, VALUE_STATS, layer_dirname, meta_dir
from pipeline.store.tables import IMAGES_SCHEMA, PartFiles, column_names

TOPK_FILE = "topk.npz"


def check_k(k: int) -> int:
    """``k`` as an int, or PipelineError when it is not a positive integer."""
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise PipelineError(f"k must be a positive integer, got {k!r}.")
    return int(k)


def check_by(by: str) -> None:
    if by not in VALUE_STATS:
        raise PipelineError(f"by must be 'max' or 'mean', got {by!r}.")


class StoreReader:
    """The committed state of one store generation, read lazily and cached."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self._committed: pa.Table | None = None
        self._img: dict[str, pa.Array] | None = None
        self._img_rows: np.ndarray = np.empty(0, np.int64)
        self._img_file: PartFiles | None = None
        self._img_groups: dict[int, pa.Table] = {}
        self._lookup: dict[str, int] | None = None
        self._lookups = 0
        self._tops: dict[str, dict[str, tk.TopK]] = {}
        self._parts: dict[str, PartFiles] = {}
        self._layer_manifests: dict[str, dict[str, Any]] = {}

    @property
    def generation(self) -> int:
        return int(self.manifest["generation"])

    @property
    def top_k(self) -> int:
        """How many entries per channel the stored top-K lists hold."""
        return int(self.manifest["top_k"])

    @property
    def dtype(self) -> str:
        return str(self.manifest["dtype"])

    # ---------------------------------------------------------------------------- layers ---

    def layers(self) -> list[str]:
        """Names of the committed layers."""
        return sorted(self.manifest["layers"])

    def layer_info(self, layer: str) -> dict[str, Any]:
        """The store manifest's entry of ``layer`` (channels, hw, n_rows, state), or a PipelineError
        naming the layers the store has."""
        info = self.manifest["layers"].get(layer)
        if info is None:
            names = self.layers()
            if not names:
                raise PipelineError(f"the activation store at {self.root} has no layers yet: {EXTRACT_HINT}.")
            raise PipelineError(f"unknown layer {layer!r}; the store has: {', '.join(names)}."
                                f"{suggest(layer, names)}")
        return info

    def channels(self, layer: str) -> int:
        """Number of channels of ``layer``."""
        return int(self.layer_info(layer)["channels"])

    def hw(self, layer: str) -> tuple[int, int]:
        """Spatial size (H, W) of ``layer``'s output (argmax = y*W + x)."""
        h, w = self.layer_info(layer)["hw"]
        return int(h), int(w)

    def check_channel(self, layer: str, channel: int) -> int:
        c = self.channels(layer)
        if not isinstance(channel, (int, np.integer)) or not 0 <= int(channel) < c:
            raise PipelineError(f"channel {channel} is out of range for layer {layer!r}, which has {c} "
                                f"channels: use 0..{c - 1}.")
        return int(channel)

    def layer_manifest(self, layer: str) -> dict[str, Any]:
        """The layer's own manifest (its parts, with their row ranges)."""
        m = self._layer_manifests.get(layer)
        if m is None:
            m = read_manifest(meta_dir(self.root, layer))
            if m is None:
                raise PipelineError(f"the store's files for layer {layer!r} are missing: delete {self.root} "
                                    f"and {EXTRACT_HINT}.")
            self._layer_manifests[layer] = m
        return m

    def tops(self, layer: str) -> dict[str, tk.TopK]:
        """The stored top-K lists of ``layer`` by "max" and by "mean"."""
        t = self._tops.get(layer)
        if t is None:
            with np.load(meta_dir(self.root, layer) / TOPK_FILE) as z:
                t = {s: tk.TopK.from_arrays(z, s) for s in VALUE_STATS}
            self._tops[layer] = t
        return t

    def parts(self, layer: str) -> PartFiles:
        """Open handles of the layer's parts, in the order its manifest lists them."""
        p = self._parts.get(layer)
        if p is None:
            ldir = self.root / layer_dirname(layer)
            p = PartFiles([ldir / part["file"] for part in self.layer_manifest(layer)["parts"]])
            self._parts[layer] = p
        return p

    def _dataset_columns(self, layer: str, columns: Sequence[str]) -> pa.Table:
        """``columns`` of every part of ``layer``, parts in file-name order (as a Parquet dataset
        reader of the layer folder orders them)."""
        parts = sorted(self.parts(layer).paths, key=lambda p: p.name)
        if not parts:
            return pa.table({c: pa.array([], pa.float32()) for c in columns})
        return pa.concat_tables([pq.read_table(p, columns=list(columns)) for p in parts])

    # ---------------------------------------------------------------------------- images ---

    def committed_images(self) -> pa.Table:
        """The committed images table (read once per generation)."""
        if self._committed is None:
            path = self.root / IMAGES
            self._committed = pq.read_table(path) if self.generation and path.exists() \
                else IMAGES_SCHEMA.empty_table()
        return self._committed

    def committed_rows(self) -> np.ndarray:
        return self.committed_images().column("row_id").to_numpy() if self.generation else np.empty(0, np.int64)

    def images(self) -> pd.DataFrame:
        """The images table (row_id, image_id, path, label, split, prediction, top5_*, true_score)."""
        return self.committed_images().to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get).astype(
            {"row_id": np.int64})

    def image_arrays(self) -> dict[str, pa.Array]:
        """row_id, image_id, path, label of every image as single-chunk Arrow arrays (cached)."""
        if self._img is None:
            t = self.committed_images().select(["row_id", "image_id", "path", "label"])
            self._img = {name: t.column(name).combine_chunks() for name in t.column_names}
            self._img_rows = self._img["row_id"].to_numpy()
        return self._img

    def image_rows(self) -> np.ndarray:
        """Sorted row ids of every image (the order of :meth:`image_arrays`)."""
        self.image_arrays()
        return self._img_rows

    def _image_info(self, rows: np.ndarray) -> dict[str, Any]:
        """image_id, path, label of ``rows``. Until the whole table is needed, only the row groups
        of images.parquet that hold the rows are read (their row_id statistics say which) and kept,
        so a first query on a large store does not load every image's path."""
        table = self._images_row_groups(rows) if self._img is None and self.generation else None
        if table is None:
            cols, src_rows = self.image_arrays(), self._img_rows
        else:
            src_rows = table.column("row_id").to_numpy()
            cols = {c: table.column(c) for c in ("image_id", "path", "label")}
        take = pa.array(np.searchsorted(src_rows, rows))
        return {"image_id": cols["image_id"].take(take).to_numpy(zero_copy_only=False),
                "path": cols["path"].take(take).to_numpy(zero_copy_only=False),
                "label": pd.array(cols["label"].take(take).to_pylist(), dtype="Int64")}

    def _images_row_groups(self, rows: np.ndarray) -> pa.Table | None:
        """The cached row groups holding ``rows`` (read on demand), or None once a quarter of the
        table has been read (then the whole table is cheaper)."""
        if self._img_file is None:
            self._img_file = PartFiles([self.root / IMAGES])
        ranges = self._img_file.row_group_ranges(0)
        groups = np.unique(np.searchsorted(ranges[:, 1], rows))
        missing = [int(g) for g in groups if int(g) not in self._img_groups]
        if 4 * (len(self._img_groups) + len(missing)) > len(ranges):
            return None
        f = self._img_file.file(0)
        for g in missing:
            self._img_groups[g] = f.read_row_group(g, columns=["row_id", "image_id", "path", "label"])
        return pa.concat_tables([self._img_groups[int(g)] for g in groups]).combine_chunks()

    def frame(self, rows: np.ndarray, **columns: Any) -> pd.DataFrame:
        """A result table: row_id, image_id, path, label, then ``columns``."""
        rows = np.asarray(rows, np.int64)
        return pd.DataFrame({"row_id": rows, **self._image_info(rows), **columns})

    def row_of(self, image: str) -> int:
        """The row_id of an image given by image id or path: a linear scan for the first lookups
        (cheap for one query), then a hash table built once for the rest."""
        arrays = self.image_arrays()
        self._lookups += 1
        if self._lookup is None and self._lookups > 2:
            self._lookup = dict(zip(arrays["path"].to_pylist(), range(len(self._img_rows))))
            self._lookup.update(zip(arrays["image_id"].to_pylist(), range(len(self._img_rows))))
        if self._lookup is not None:
            at = self._lookup.get(str(image), -1)
        else:
            at = max(pc.index(arrays[name], str(image)).as_py() for name in ("image_id", "path"))
        if at >= 0:
            return int(self._img_rows[at])
        n = len(self._img_rows)
        hint = suggest(str(image), arrays["path"].to_pylist()) if n <= 10000 else ""
        raise PipelineError(f"unknown image {image!r}: it is neither an image id nor a path in the store "
                            f"({n} images).{hint}")

    # ----------------------------------------------------------------------------- top-K ---

    def topk(self, layer: str, channel: int, k: int = 5, by: str = "max") -> pd.DataFrame:
        """The ``k`` images that fire ``layer``'s ``channel`` most (see ``ActivationStore.topk``)."""
        self.layer_info(layer)
        c = self.check_channel(layer, channel)
        check_by(by)
        k = check_k(k)
        top = self.tops(layer)[by]
        width = top.values.shape[1]
        if k <= width or width < self.top_k:
            rows, vals, am = top.rows[c, :k], top.values[c, :k], top.argmax[c, :k]
        else:
            t = self.parts(layer).read(["row_id", f"{by}_{c}", f"argmax_{c}"])
            all_rows = t.column("row_id").to_numpy()
            values = t.column(f"{by}_{c}").to_numpy().astype(np.float32)
            idx = tk.column_topk(values, all_rows, k)
            rows, vals, am = all_rows[idx], values[idx], t.column(f"argmax_{c}").to_numpy()[idx]
        w = self.hw(layer)[1]
        return self.frame(rows, value=vals, y=am // w, x=am % w)

    def top_images(self, layer: str, k: int, by: str = "max") -> pd.DataFrame:
        """Per channel of ``layer``: ``value`` (the largest over every image, -inf when the layer
        has no rows) and ``top`` (the image ids of the first ``k`` entries of the stored top-K,
        k <= top_k). The same lookup as :meth:`topk` for every channel at once, without a table per
        channel (wide layers have thousands)."""
        self.layer_info(layer)
        check_by(by)
        k = check_k(k)
        rows_sorted = self.image_rows()
        ids_sorted = self.image_arrays()["image_id"].to_numpy(zero_copy_only=False)
        top = self.tops(layer)[by]
        rows = top.rows[:, :k]
        at = np.searchsorted(rows_sorted, rows).clip(0, max(len(rows_sorted) - 1, 0))
        valid = (rows != tk.PAD_ROW) & (rows_sorted[at] == rows) if len(rows_sorted) else np.zeros(rows.shape, bool)
        ids = ids_sorted[at] if len(rows_sorted) else np.empty(rows.shape, object)
        first = np.where(valid[:, 0], top.values[:, 0], -np.inf) if rows.shape[1] else np.full(top.channels, -np.inf)
        return pd.DataFrame({"channel": np.arange(top.channels), "value": first,
                             "top": [ids[c][valid[c]].tolist() for c in range(top.channels)]})

    def top_neurons(self, layer: str, image: str, k: int = 10, by: str = "max") -> pd.DataFrame:
        """The ``k`` channels of ``layer`` that ``image`` (id or path) excites most: channel, value, y, x."""
        self.layer_info(layer)
        check_by(by)
        k = check_k(k)
        row = self.row_of(image)
        c = self.channels(layer)
        t = self.parts(layer).read_row(row, [*column_names(by, c), *column_names("argmax", c)])
        if t is None:
            raise PipelineError(f"image {image!r} has no activations for layer {layer!r}.")
        values = np.array([t.column(f"{by}_{j}")[0].as_py() for j in range(c)], np.float32)
        am = np.array([t.column(f"argmax_{j}")[0].as_py() for j in range(c)], np.int64)
        idx = tk.column_topk(values, np.arange(c), min(k, c))
        w = self.hw(layer)[1]
        return pd.DataFrame({"channel": idx, "value": values[idx], "y": am[idx] // w, "x": am[idx] % w})

    # ---------------------------------------------------------------------- pooled values ---

    def mean_columns(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """Row ids (N,) and the spatial means (N, C) float32 of every stored image of ``layer``,
        parts in file-name order."""
        cols = column_names("mean", self.channels(layer))
        table = self._dataset_columns(layer, ["row_id", *cols])
        vectors = np.empty((table.num_rows, len(cols)), np.float32)
        for j, c in enumerate(cols):
            vectors[:, j] = table.column(c).to_numpy()
        return table.column("row_id").to_numpy().astype(np.int64), vectors

    def pooled(self, layer: str, image_ids: Sequence[str]) -> np.ndarray | None:
        """Spatial means (N,C) of ``layer`` for ``image_ids`` (the ``mean_*`` columns), in that order;
        None when the store misses one of the images."""
        images = self.images()
        row_of = dict(zip(images["image_id"].astype(str), images["row_id"]))
        if any(i not in row_of for i in image_ids):
            return None
        columns = column_names("mean", self.channels(layer))
        table = self._dataset_columns(layer, ["row_id", *columns])
        position = pd.Series(np.arange(table.num_rows), index=table.column("row_id").to_numpy())
        rows = [row_of[i] for i in image_ids]
        if not position.index.is_unique or any(r not in position.index for r in rows):
            return None
        idx = position.loc[rows].to_numpy()
        return np.stack([table.column(c).to_numpy().astype(np.float32)[idx] for c in columns], axis=1)

    def channel_means(self, layer: str) -> tuple[np.ndarray, int]:
        """The mean over every stored image of each channel's per-image mean activation (float64,
        (C,); zeros for a layer without rows) and the number of images."""
        c = self.channels(layer)
        table = self._dataset_columns(layer, column_names("mean", c))
        means = np.array([table.column(j).to_numpy().astype(np.float64).mean() if table.num_rows else 0.0
                          for j in range(c)])
        return means, table.num_rows
