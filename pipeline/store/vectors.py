"""The vector side of a store: FAISS indexes of a layer's mean vectors, searches, and class means.

A :class:`StoreVectors` belongs to one :class:`~pipeline.store.reader.StoreReader` (one committed
generation) and caches the loaded indexes and per-class sums; index files live in
``.meta/<layer>/index-<kind>-<metric>/`` and are valid while their ``state`` matches the layer's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.cache import make_key, read_manifest
from pipeline.errors import PipelineError
from pipeline.store import search
from pipeline.store.layout import EXTRACT_HINT, INDEX_HINT, meta_dir, tmp_path
from pipeline.store.reader import StoreReader, check_k
from pipeline.store.records import NA_LABEL, label_code
from pipeline.store.tables import column_names

Searcher = tuple[Any, search.FlatIndex, str]


def _short_list(items: list[Any], n: int = 20) -> str:
    return ", ".join(map(str, items[:n])) + (", ..." if len(items) > n else "") if items else "none"


class StoreVectors:
    """Indexes, searches and class directions over one generation's mean vectors."""

    def __init__(self, reader: StoreReader) -> None:
        self.reader = reader
        self._flat_cache: dict[tuple[str, str], search.FlatIndex] = {}
        self._approx_cache: dict[tuple[str, str, str], search.ApproxSearch] = {}
        self._searchers: dict[tuple[str, str | None, bool, str], Searcher] = {}
        self._class_cache: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _index_dir(self, layer: str, kind: str, metric: str) -> Path:
        return meta_dir(self.reader.root, layer) / search.index_dirname(kind, metric)

    # --------------------------------------------------------------------------- building ---

    def build_index(self, layer: str, kind: str = "flat", metric: str = "ip", **params: Any) -> dict[str, Any]:
        """Build the FAISS index of ``layer``'s mean vectors unless an up-to-date one exists
        (see ``ActivationStore.build_index``)."""
        info = self.reader.layer_info(layer)
        search.check_kind_metric(kind, metric)
        if info["n_rows"] == 0:
            raise PipelineError(f"layer {layer!r} has no rows to index: {EXTRACT_HINT} first.")
        folder = self._index_dir(layer, kind, metric)
        params = {k: v for k, v in sorted(params.items())}
        old = read_manifest(folder)
        if old and old.get("state") == info["state"] and old.get("params") == params:
            return {**old, "built": False}
        base = {"layer": layer, "state": info["state"], "params": params, "generation": self.reader.generation}
        if kind == "flat":
            built = self._build_flat(layer, folder, metric, base, params)
        else:
            self.build_index(layer, "flat", metric)
            flat = self.flat(layer, metric)
            built = search.build_approx(folder, flat, kind, base, params, self._sample_directions(layer))
        self._flat_cache.pop((layer, metric), None)
        self._approx_cache.pop((layer, kind, metric), None)
        self._searchers.clear()
        return {**(read_manifest(folder) or built), "built": True}

    def _sample_directions(self, layer: str, n: int = 48) -> list[np.ndarray]:
        """Class-mean differences of random class pairs (calibration queries for approximate indexes)."""
        labels, sums, counts = self._class_sums(layer)
        if len(labels) < 2:
            return []
        rng = np.random.default_rng(2)
        means = sums / counts[:, None]
        return [means[a] - means[b] for a, b in rng.choice(len(labels), (n, 2)) if a != b]

    def _build_flat(self, layer: str, folder: Path, metric: str, base: dict[str, Any],
                    params: dict[str, Any]) -> dict[str, Any]:
        c = self.reader.channels(layer)
        cols = ["row_id", *column_names("mean", c)]

        def blocks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for t in self.reader.parts(layer).iter_read(cols):
                block = np.empty((t.num_rows, c), np.float32)
                for j in range(c):
                    block[:, j] = t.column(j + 1).to_numpy()
                yield t.column(0).to_numpy(), block

        extra = {k: params[k] for k in ("prescan_min_rows", "prescan_shards") if k in params}
        unknown = set(params) - set(extra)
        if unknown:
            raise PipelineError(f"unknown flat index parameter(s) {', '.join(sorted(unknown))}: "
                                "use prescan_min_rows, prescan_shards.")
        n = int(self.reader.layer_info(layer)["n_rows"])
        return search.build_flat(folder, blocks(), n, c, metric, base, **extra)

    # ---------------------------------------------------------------------------- loading ---

    def flat(self, layer: str, metric: str) -> search.FlatIndex:
        """The up-to-date exact index of ``layer`` (loaded once), or a PipelineError naming the fix."""
        key = (layer, metric)
        idx = self._flat_cache.get(key)
        if idx is None:
            folder = self._fresh_index(layer, "flat", metric)
            idx = self._flat_cache[key] = search.FlatIndex(folder)
        return idx

    def _is_fresh(self, layer: str, kind: str, metric: str) -> bool:
        m = read_manifest(self._index_dir(layer, kind, metric))
        return bool(m) and m.get("state") == self.reader.layer_info(layer)["state"]

    def _fresh_index(self, layer: str, kind: str, metric: str) -> Path:
        folder = self._index_dir(layer, kind, metric)
        m = read_manifest(folder)
        state = self.reader.layer_info(layer)["state"]
        what = "exact (flat)" if kind == "flat" else kind
        if m is None:
            raise PipelineError(f"no {what} {metric} index for layer {layer!r}: {INDEX_HINT} "
                                f"(store.build_index({layer!r}, kind={kind!r}, metric={metric!r})).")
        if m.get("state") != state:
            raise PipelineError(f"the {what} {metric} index of layer {layer!r} is out of date (the store "
                                f"changed since it was built): {INDEX_HINT}.")
        return folder

    def mean_vectors(self, layer: str) -> tuple[np.ndarray, np.ndarray, str]:
        """Row ids (N,) and raw mean vectors (N, C) float32 of every image of ``layer``, and where they
        came from: the up-to-date exact inner-product index ("index-flat-ip", a read-only view of
        its memory-mapped vectors) or else the Parquet mean columns ("parquet")."""
        if self._is_fresh(layer, "flat", "ip"):
            flat = self.flat(layer, "ip")
            vectors = flat.vectors.view()
            vectors.flags.writeable = False
            return flat.rows, vectors, "index-flat-ip"
        rows, vectors = self.reader.mean_columns(layer)
        return rows, vectors, "parquet"

    def _searcher(self, layer: str, metric: str | None, exact: bool, prefer: str) -> Searcher:
        """The exact or approximate search function for ``layer``, its flat index and its metric
        (resolved once per store state)."""
        key = (layer, metric, exact, prefer)
        if key not in self._searchers:
            self._searchers[key] = self._find_searcher(layer, metric, exact, prefer)
        return self._searchers[key]

    def _find_searcher(self, layer: str, metric: str | None, exact: bool, prefer: str) -> Searcher:
        kinds = ["flat"] if exact else ["ivf", "hnsw"]
        metrics = [metric] if metric else [prefer, *[m for m in search.METRICS if m != prefer]]
        if metric:
            search.check_kind_metric(kinds[0], metric)
        for m in metrics:
            for kind in kinds:
                if self._is_fresh(layer, kind, m):
                    flat = self.flat(layer, m)
                    if kind == "flat":
                        return flat.search, flat, m
                    key = (layer, kind, m)
                    if key not in self._approx_cache:
                        self._approx_cache[key] = search.ApproxSearch.load(self._index_dir(layer, kind, m), flat)
                    return self._approx_cache[key].search, flat, m
        # Nothing usable: raise the precise error for the first choice.
        self._fresh_index(layer, kinds[0], metrics[0])
        raise PipelineError(f"no approximate index for layer {layer!r}: {INDEX_HINT} with kind=ivf or hnsw.")

    # ----------------------------------------------------------------------------- search ---

    def direction(self, layer: str, vector: Any, k: int = 10, metric: str | None = None,
                  exact: bool = True) -> pd.DataFrame:
        """The ``k`` images whose mean vector scores highest along ``vector`` (see ``ActivationStore``)."""
        k = check_k(k)
        fn, flat, m = self._searcher(layer, metric, exact, prefer="ip")
        q = search.prepare_query(vector, self.reader.channels(layer), m)
        pos, scores = fn(q, k)
        return self.reader.frame(flat.rows[pos], score=scores)

    def neighbours(self, layer: str, image: str, k: int = 10, metric: str | None = None,
                   exact: bool = True) -> pd.DataFrame:
        """The ``k`` images most similar to ``image`` in ``layer``, excluding itself (see ``ActivationStore``)."""
        k = check_k(k)
        row = self.reader.row_of(image)
        fn, flat, m = self._searcher(layer, metric, exact, prefer="cosine")
        at = int(flat.positions(np.array([row]))[0])
        if at < 0:
            raise PipelineError(f"image {image!r} is not in the index of layer {layer!r}: {INDEX_HINT}.")
        q = flat.vectors[at].astype(np.float64)
        if m == "cosine" and not np.any(q):
            raise PipelineError(f"image {image!r} has an all-zero mean vector in layer {layer!r}: "
                                "cosine neighbours are undefined; use metric='ip'.")
        pos, scores = fn(q, k + 1)
        keep = flat.rows[pos] != row
        pos, scores = pos[keep][:k], scores[keep][:k]
        return self.reader.frame(flat.rows[pos], score=scores)

    # ------------------------------------------------------------------------ class means ---

    def class_direction(self, layer: str, class_a: int, class_b: int) -> np.ndarray:
        """Mean vector of class ``class_a``'s images minus that of ``class_b`` (float64, (C,))."""
        labels, sums, counts = self._class_sums(layer)
        out = []
        for cls in (class_a, class_b):
            i = np.searchsorted(labels, cls)
            if i >= len(labels) or labels[i] != cls:
                raise PipelineError(f"class {cls} has no images in the store; classes present: "
                                    f"{_short_list(labels.tolist())}.")
            out.append(sums[i] / counts[i])
        return out[0] - out[1]

    def _class_sums(self, layer: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labels, per-label sums of the mean vectors, counts), from one pass over the mean columns,
        cached in ``.meta/<layer>/class_sums.npz`` until the store changes."""
        info = self.reader.layer_info(layer)
        cached = self._class_cache.get(layer)
        if cached is not None:
            return cached
        path = meta_dir(self.reader.root, layer) / "class_sums.npz"
        key = make_key(state=info["state"], generation=self.reader.generation)
        if path.exists():
            with np.load(path) as z:
                if str(z["key"]) == key:
                    self._class_cache[layer] = (z["labels"], z["sums"], z["counts"])
                    return self._class_cache[layer]
        arrays = self.reader.image_arrays()
        img_rows = self.reader.image_rows()
        img_labels = label_code(arrays["label"].to_pandas())
        c = int(info["channels"])
        acc: dict[int, np.ndarray] = {}
        cnt: dict[int, int] = {}
        for t in self.reader.parts(layer).iter_read(["row_id", *column_names("mean", c)]):
            lab = img_labels[np.searchsorted(img_rows, t.column(0).to_numpy())]
            ok = lab != NA_LABEL
            if not ok.any():
                continue
            block = np.empty((t.num_rows, c), np.float64)
            for j in range(c):
                block[:, j] = t.column(j + 1).to_numpy()
            block, lab = block[ok], lab[ok]
            order = np.argsort(lab, kind="stable")
            uniq, starts, counts = np.unique(lab[order], return_index=True, return_counts=True)
            sums = np.add.reduceat(block[order], starts, axis=0)
            for u, s, n in zip(uniq.tolist(), sums, counts.tolist()):
                acc[u] = acc[u] + s if u in acc else s
                cnt[u] = cnt.get(u, 0) + n
        labels = np.array(sorted(acc), np.int64)
        result = (labels, np.array([acc[u] for u in labels.tolist()]).reshape(len(labels), c),
                  np.array([cnt[u] for u in labels.tolist()], np.int64))
        tmp = tmp_path(path)
        with open(tmp, "wb") as f:
            np.savez(f, key=key, labels=result[0], sums=result[1], counts=result[2])
        os.replace(tmp, path)
        self._class_cache[layer] = result
        return result
