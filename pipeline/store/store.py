"""The activation store's one public door: :class:`ActivationStore`, a small facade over the
reader (:mod:`~pipeline.store.reader`), the writer of each shard's plan (:mod:`~pipeline.store.writer`),
the commit and its roll-forward (:mod:`~pipeline.store.commit`) and the vector side
(:mod:`~pipeline.store.vectors`). See the package docstring for the layout and the API.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.cache import atomic_write_json, read_manifest
from pipeline.errors import PipelineError
from pipeline.store.commit import Commit, apply_pending_commit
from pipeline.store.layout import DTYPES, EXTRACT_HINT, FORMAT, STORE_MANIFEST, VERSION
from pipeline.store.reader import StoreReader
from pipeline.store.vectors import StoreVectors
from pipeline.store.writer import Plan, ShardWriter, make_plan, shard_status


class ActivationStore:
    """One model's activation store; see the package docstring for the layout and the API."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self._writers: dict[int, ShardWriter] = {}
        self._load(manifest)

    def _load(self, manifest: dict[str, Any]) -> None:
        """Read the generation of ``manifest`` afresh (no cache outlives a commit)."""
        self._reader = StoreReader(self.root, manifest)
        self._vectors = StoreVectors(self._reader)

    @classmethod
    def open(cls, root: str | os.PathLike, model_key: str, create: bool = False, top_k: int = 100,
             dtype: str = "float32") -> ActivationStore:
        """Open the store at ``root`` (``<cache>/store/<model_key>``), creating it when ``create``.

        ``top_k`` and ``dtype`` ("float32"/"float16") apply to a new store; an existing store keeps
        its own. Raises PipelineError when the store is missing or was built with another model.
        """
        root = Path(root)
        if dtype not in DTYPES:
            raise PipelineError(f"unknown store dtype {dtype!r}: use float32 or float16.")
        if top_k < 1:
            raise PipelineError(f"top_k must be at least 1, got {top_k}.")
        apply_pending_commit(root)
        manifest = read_manifest(root)
        if manifest is None:
            if not create:
                raise PipelineError(f"no activation store at {root}: {EXTRACT_HINT} first.")
            manifest = {"format": FORMAT, "version": VERSION, "model_key": model_key, "generation": 0,
                        "next_row_id": 0, "n_images": 0, "top_k": int(top_k), "dtype": dtype, "layers": {}}
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(root / STORE_MANIFEST, manifest)
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise PipelineError(f"{root} is not an activation store of format version {VERSION}: "
                                f"delete it and {EXTRACT_HINT}.")
        if manifest["model_key"] != model_key:
            raise PipelineError(f"the activation store at {root} was built with another model "
                                f"(key {manifest['model_key'][:12]}..., asked for {model_key[:12]}...): "
                                f"use that model, or {EXTRACT_HINT} for this one.")
        return cls(root, manifest)

    @property
    def manifest(self) -> dict[str, Any]:
        """The committed store manifest (generation, next_row_id, n_images, top_k, dtype, layers)."""
        return self._reader.manifest

    @property
    def generation(self) -> int:
        return self._reader.generation

    @property
    def top_k(self) -> int:
        """How many images per channel the stored top-K lists hold (``topk`` scans past it)."""
        return self._reader.top_k

    @property
    def dtype(self) -> str:
        return self._reader.dtype

    # --------------------------------------------------------------------------- writing ---

    def plan(self, records: pd.DataFrame, layers: Sequence[str], shard: int = 0, num_shards: int = 1,
             job: Mapping[str, Any] | None = None) -> Plan:
        """This shard's records that need the model, with stable row ids; write them with
        ``plan.write(chunk, layers, predictions)`` for each chunk of ``plan.chunks(part_size)``.

        ``layers`` are the layers the caller will write. Also cleans the shard's work folder of
        anything its journal does not list (a killed run's half-written files). ``job`` (what runs
        this shard: a scheduler's job id, host, pid) is kept in the shard's folder, so that
        :meth:`shard_status` can name the job of a shard that has not finished. A newer plan of the
        same shard, or a finalize, ends the plan: its ``write`` then raises PipelineError.
        """
        plan = make_plan(self._reader, records, layers, shard, num_shards, job)
        old = self._writers.get(shard)
        if old is not None:
            old.closed = "a newer plan of the same shard replaced it"
        self._writers[shard] = plan.writer
        return plan

    def shard_status(self, records: pd.DataFrame) -> dict[str, Any]:
        """The sharded extraction waiting to be merged: ``num_shards`` (None when no shard has
        started), ``missing`` (shard -> images of ``records`` it has not written yet) and ``jobs``
        (shard -> what runs or ran it, as given to :meth:`plan`)."""
        return shard_status(self._reader, records)

    def finalize(self, records: pd.DataFrame) -> dict[str, Any]:
        """Commit the next generation from every shard's journal; a no-op when nothing changed.

        Returns counts: generation, changed, n_images, added, removed, and per layer the rows,
        parts, compacted parts and channels whose top-K was recomputed. Ends every open plan.
        """
        commit = Commit(self._reader)
        stats = commit.run(records)
        for w in self._writers.values():
            w.closed = "the store was finalized since"
        self._writers.clear()
        if stats["changed"]:
            self._load(commit.manifest)
        return stats

    def build_index(self, layer: str, kind: str = "flat", metric: str = "ip", **params: Any) -> dict[str, Any]:
        """Build the FAISS index of ``layer``'s mean vectors unless an up-to-date one exists.

        kind: "flat" (exact; params ``prescan_min_rows``, ``prescan_shards``), "ivf" (``nlist``,
        ``train_size``, ``refine``, ``target_recall``) or "hnsw" (``M``, ``ef_construction``, ``refine``,
        ``target_recall``); metric "ip" or "cosine". Approximate kinds also build the flat index of
        the same metric (their re-rank reads its vectors). Returns the index manifest plus ``built``.
        """
        return self._vectors.build_index(layer, kind, metric, **params)

    # --------------------------------------------------------------------------- reading ---

    def layers(self) -> list[str]:
        """Names of the committed layers."""
        return self._reader.layers()

    def channels(self, layer: str) -> int:
        """Number of channels of ``layer``."""
        return self._reader.channels(layer)

    def hw(self, layer: str) -> tuple[int, int]:
        """Spatial size (H, W) of ``layer``'s output (argmax = y*W + x)."""
        return self._reader.hw(layer)

    def images(self) -> pd.DataFrame:
        """The images table (row_id, image_id, path, label, split, prediction, top5_*, true_score)."""
        return self._reader.images()

    def row_of(self, image: str) -> int:
        """The row id of an image given by image id or path (PipelineError for an unknown one)."""
        return self._reader.row_of(image)

    def topk(self, layer: str, channel: int, k: int = 5, by: str = "max") -> pd.DataFrame:
        """The ``k`` images that fire ``layer``'s ``channel`` most (by spatial max or mean).

        A lookup in the stored top-K; a column scan when ``k`` exceeds it. Columns: row_id, image_id,
        path, label, value, y, x (position of the channel's spatial max in that image).
        """
        return self._reader.topk(layer, channel, k, by)

    def top_images(self, layer: str, k: int, by: str = "max") -> pd.DataFrame:
        """Every channel of ``layer`` at once: channel, value (its largest over all images) and top
        (image ids of its first ``k`` <= top_k images), from the stored top-K."""
        return self._reader.top_images(layer, k, by)

    def top_neurons(self, layer: str, image: str, k: int = 10, by: str = "max") -> pd.DataFrame:
        """The ``k`` channels of ``layer`` that ``image`` (id or path) excites most: channel, value, y, x."""
        return self._reader.top_neurons(layer, image, k, by)

    def pooled(self, layer: str, image_ids: Sequence[str]) -> np.ndarray | None:
        """Spatial means (N,C) of ``layer`` for ``image_ids`` (the ``mean_*`` columns), in that order;
        None when the store misses one of the images."""
        return self._reader.pooled(layer, image_ids)

    def channel_means(self, layer: str) -> tuple[np.ndarray, int]:
        """Each channel's per-image mean activation averaged over every stored image ((C,) float64)
        and the number of images."""
        return self._reader.channel_means(layer)

    def mean_vectors(self, layer: str) -> tuple[np.ndarray, np.ndarray, str]:
        """Row ids, raw mean vectors (N, C) float32 (read-only) and their source of every image of
        ``layer``: the up-to-date exact inner-product index ("index-flat-ip") or else the Parquet
        mean columns ("parquet")."""
        return self._vectors.mean_vectors(layer)

    def direction(self, layer: str, vector: Any, k: int = 10, metric: str | None = None,
                  exact: bool = True) -> pd.DataFrame:
        """The ``k`` images whose mean vector scores highest along ``vector`` (IP or cosine).

        Uses the exact index (or an approximate one with ``exact=False``); ``metric`` None picks an
        up-to-date index, preferring inner product. Columns: row_id, image_id, path, label, score.
        """
        return self._vectors.direction(layer, vector, k, metric, exact)

    def neighbours(self, layer: str, image: str, k: int = 10, metric: str | None = None,
                   exact: bool = True) -> pd.DataFrame:
        """The ``k`` images most similar to ``image`` (id or path) in ``layer``, excluding itself.

        ``metric`` None picks an up-to-date index, preferring cosine. Columns as in ``direction``.
        """
        return self._vectors.neighbours(layer, image, k, metric, exact)

    def class_direction(self, layer: str, class_a: int, class_b: int) -> np.ndarray:
        """Mean vector of class ``class_a``'s images minus that of ``class_b`` (float64, (C,)).

        Per-class sums come from one pass over the mean columns and are cached in ``.meta`` until the
        store changes.
        """
        return self._vectors.class_direction(layer, class_a, class_b)
