"""The activation store: incremental, shardable, crash-safe writing, and millisecond queries.

Writing (one generation per finalize):

* ``plan`` compares the dataset's records with the committed store and with the journals of the
  unfinished generation, and returns this shard's records that still need the model: new images,
  images missing a requested layer, and images whose label changed (their ``true_score`` needs the
  model). Row ids are assigned deterministically: committed and journaled images keep theirs, new
  image ids (sorted) take the free ids from ``next_row_id`` upward, so every shard and every resumed
  run assigns the same ids.
* ``write_part`` writes one chunk: layer parts and an images chunk into the shard's work folder
  (temporary file + ``os.replace`` each), the shard's running top-K, then the shard journal (its
  commit point). Anything not listed in a journal is deleted by the next ``plan``.
* ``finalize`` builds the next generation from the committed store and every shard journal: it
  drops removed images, compacts the parts that held them, merges top-Ks (recomputing from the
  data only the channels whose list lost a row), stages everything under ``.work/commit/`` and
  writes ``.work/commit.json`` (the commit point). Applying it (moves, deletes, manifests, store
  manifest last) is idempotent and is redone by the next ``open`` if the process dies half way.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.cache import atomic_write_json, make_key, read_manifest
from pipeline.errors import PipelineError, suggest
from pipeline.store import search, topk as tk
from pipeline.store.layout import (FORMAT, IMAGES, META, STORE_MANIFEST, VALUE_STATS, VERSION, WORK,
                                   compacted_name, crash_point, layer_dirname, part_name, tmp_path,
                                   write_parquet_atomic)
from pipeline.store.tables import IMAGES_SCHEMA, PartFiles, column_names, images_table, part_table

EXTRACT_HINT = "run `python -m pipeline stage=extract`"
INDEX_HINT = "run `python -m pipeline stage=index`"
NA_LABEL = np.iinfo(np.int64).min
DTYPES = {"float32": np.float32, "float16": np.float16}
_SHARD_DIR = re.compile(r"^s(\d{3})of(\d{3})$")
JOB_FILE = "job.json"  # in a shard's work folder: the job that runs it


# ----------------------------------------------------------------------------------- records ---

def normalize_records(records: pd.DataFrame) -> pd.DataFrame:
    """image_id, path, label (Int64), split; one row per image id (first path), sorted by image id."""
    if not isinstance(records, pd.DataFrame):
        raise PipelineError("records must be a pandas DataFrame with columns image_id, path, label, split.")
    missing = [c for c in ("image_id", "path") if c not in records.columns]
    if missing:
        raise PipelineError(f"records lack the column(s) {', '.join(missing)}: "
                            "give image_id (sha256 of the file), path, label and split.")
    if records["image_id"].isna().any():
        raise PipelineError("records contain rows without an image_id.")
    n = len(records)
    label = records["label"] if "label" in records.columns else pd.Series([pd.NA] * n, index=records.index)
    split = records["split"] if "split" in records.columns else pd.Series([None] * n, index=records.index)
    try:
        label = label.astype("Int64")
    except (TypeError, ValueError) as e:
        raise PipelineError(f"record labels must be integers (or missing): {e}") from None
    df = pd.DataFrame({"image_id": records["image_id"].astype(str).to_numpy(),
                       "path": records["path"].astype(str).to_numpy(),
                       "label": label.to_numpy(),
                       "split": split.astype(object).where(split.notna(), None).to_numpy()})
    df = df.sort_values(["image_id", "path"], kind="stable").drop_duplicates("image_id", keep="first")
    return df.reset_index(drop=True)


def _label_code(labels: Any) -> np.ndarray:
    """Labels as int64 with missing -> NA_LABEL, for null-safe comparisons and merges."""
    return pd.array(labels, dtype="Int64").fillna(NA_LABEL).to_numpy(np.int64)


def shard_of(image_ids: Sequence[str], num_shards: int) -> np.ndarray:
    """Deterministic shard of each image id (crc32 mod num_shards)."""
    return np.fromiter((zlib.crc32(s.encode()) for s in image_ids), np.int64, len(image_ids)) % num_shards


# -------------------------------------------------------------------------------------- plan ---

@dataclass
class Plan:
    """The records of one shard that still need processing, with row ids, sorted by image id."""

    records: pd.DataFrame
    shard: int
    num_shards: int
    layers: list[str]
    n_records: int
    n_in_shard: int

    def __len__(self) -> int:
        return len(self.records)

    @property
    def n_done(self) -> int:
        """Records of this shard already stored or journaled (skipped)."""
        return self.n_in_shard - len(self.records)

    def chunks(self, part_size: int) -> Iterator[pd.DataFrame]:
        """Consecutive chunks of ``part_size`` records (columns row_id, image_id, path, label, split)."""
        if part_size < 1:
            raise PipelineError(f"part_size must be at least 1, got {part_size}.")
        for s in range(0, len(self.records), part_size):
            yield self.records.iloc[s:s + part_size].reset_index(drop=True)


@dataclass
class _Writer:
    """In-memory state of one shard's writer between ``plan`` and ``finalize``."""

    folder: Path
    generation: int
    shard: int
    num_shards: int
    journal: dict[str, Any]
    planned: np.ndarray
    committed_rows: np.ndarray
    known_layers: dict[str, dict[str, Any]]
    done: dict[str, np.ndarray] = field(default_factory=dict)
    topk: dict[str, dict[str, tk.TopK]] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- store ---

class ActivationStore:
    """One model's activation store; see the package docstring for the layout and the API."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self._writers: dict[int, _Writer] = {}
        self._reset_caches()

    # ---------------------------------------------------------------------------- opening ---

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
        _apply_pending_commit(root)
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
    def generation(self) -> int:
        return int(self.manifest["generation"])

    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    @property
    def dtype(self) -> str:
        return str(self.manifest["dtype"])

    def _reset_caches(self) -> None:
        self._committed: pa.Table | None = None
        self._img: dict[str, pa.Array] | None = None
        self._img_rows: np.ndarray = np.empty(0, np.int64)
        self._img_file: PartFiles | None = None
        self._img_groups: dict[int, pa.Table] = {}
        self._lookup: dict[str, int] | None = None
        self._lookups = 0
        self._topk_cache: dict[str, dict[str, tk.TopK]] = {}
        self._parts_cache: dict[str, PartFiles] = {}
        self._layer_manifests: dict[str, dict[str, Any]] = {}
        self._flat_cache: dict[tuple[str, str], search.FlatIndex] = {}
        self._approx_cache: dict[tuple[str, str, str], search.ApproxSearch] = {}
        self._searchers: dict[tuple[str, str | None, bool, str], tuple[Any, search.FlatIndex, str]] = {}
        self._class_cache: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _work_dir(self) -> Path:
        return self.root / WORK / f"g{self.generation + 1:06d}"

    def _meta_dir(self, layer: str) -> Path:
        return self.root / META / layer_dirname(layer)

    # ------------------------------------------------------------------------------ plan ---

    def plan(self, records: pd.DataFrame, layers: Sequence[str], shard: int = 0, num_shards: int = 1,
             job: Mapping[str, Any] | None = None) -> Plan:
        """This shard's records that need the model, with stable row ids (see the module docstring).

        ``layers`` are the layers the caller will write. Also cleans the shard's work folder of
        anything its journal does not list (a killed run's half-written files). ``job`` (what runs
        this shard: a scheduler's job id, host, pid) is kept in the shard's folder, so that
        :meth:`shard_status` can name the job of a shard that has not finished.
        """
        if num_shards < 1 or not 0 <= shard < num_shards:
            raise PipelineError(f"shard must be in 0..{num_shards - 1} and num_shards >= 1 "
                                f"(got shard={shard}, num_shards={num_shards}).")
        layers = list(dict.fromkeys(layers))
        if not layers:
            raise PipelineError("plan needs at least one layer to extract.")
        recs = normalize_records(records)
        self._drop_stale_work()
        folder = self._work_dir() / f"s{shard:03d}of{num_shards:03d}"
        journal = _read_json(folder / "journal.json") or {
            "generation": self.generation + 1, "shard": shard, "num_shards": num_shards,
            "layers": {}, "parts": [], "state": None}
        _clean_shard_dir(folder, journal)
        if job is not None and num_shards > 1:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(folder / JOB_FILE, dict(job))
        journals = self._journals()
        versions = self._image_versions(journals, with_predictions=False)
        recs["row_id"] = self._assign_row_ids(recs, versions)
        code = _label_code(recs["label"])
        have = pd.DataFrame({"row_id": versions["row_id"], "code": versions["code"]}).drop_duplicates()
        image_done = pd.MultiIndex.from_frame(pd.DataFrame({"row_id": recs["row_id"], "code": code})).isin(
            pd.MultiIndex.from_frame(have))
        need = ~image_done
        committed_rows = self._committed_rows()
        known = {l: i for _, j in journals for l, i in j["layers"].items()}
        known.update(self.manifest["layers"])
        writer = _Writer(folder, self.generation + 1, shard, num_shards, journal, np.empty(0, np.int64),
                         committed_rows, known)
        for layer in layers:
            writer.done[layer] = self._done_rows(writer, layer, journals)
            need |= ~np.isin(recs["row_id"].to_numpy(), writer.done[layer])
        in_shard = shard_of(recs["image_id"].tolist(), num_shards) == shard
        todo = recs[need & in_shard].reset_index(drop=True)[["row_id", "image_id", "path", "label", "split"]]
        writer.planned = np.sort(todo["row_id"].to_numpy(np.int64))
        if journal.get("state"):
            with np.load(folder / journal["state"]) as z:
                for i, layer in enumerate(journal["state_layers"]):
                    writer.topk[layer] = {s: tk.TopK.from_arrays(z, f"L{i}_{s}") for s in VALUE_STATS}
        self._writers[shard] = writer
        return Plan(todo, shard, num_shards, layers, len(recs), int(in_shard.sum()))

    def _drop_stale_work(self) -> None:
        """Remove work folders of generations other than the next one (left by an older store state)."""
        work = self.root / WORK
        if not work.is_dir():
            return
        for p in work.iterdir():
            if p.is_dir() and p.name.startswith("g") and p != self._work_dir():
                shutil.rmtree(p, ignore_errors=True)

    def shard_status(self, records: pd.DataFrame) -> dict[str, Any]:
        """The sharded extraction waiting to be merged: ``num_shards`` (None when no shard has
        started), ``missing`` (shard -> images of ``records`` it has not written yet) and ``jobs``
        (shard -> what runs or ran it, as given to :meth:`plan`)."""
        work = self._work_dir()
        found = [(p, _SHARD_DIR.match(p.name)) for p in sorted(work.iterdir())] if work.is_dir() else []
        found = [(p, int(m.group(1)), int(m.group(2))) for p, m in found if m]
        if not found:
            return {"num_shards": None, "missing": {}, "jobs": {}}
        n = max(of for _, _, of in found)
        recs = normalize_records(records)
        versions = self._image_versions(self._journals(), with_predictions=False)
        have = pd.MultiIndex.from_frame(versions[["image_id", "code"]])
        written = pd.MultiIndex.from_arrays([recs["image_id"], _label_code(recs["label"])]).isin(have)
        shards = shard_of(recs.loc[~written, "image_id"].tolist(), n)
        missing = {int(k): int(v) for k, v in zip(*np.unique(shards, return_counts=True))}
        jobs = {s: _read_json(p / JOB_FILE) for p, s, of in found if of == n and (p / JOB_FILE).is_file()}
        return {"num_shards": n, "missing": missing, "jobs": {s: j for s, j in jobs.items() if j}}

    def _journals(self) -> list[tuple[Path, dict[str, Any]]]:
        """(folder, journal) of every shard of the next generation, in a fixed order."""
        work = self._work_dir()
        if not work.is_dir():
            return []
        out = []
        for p in sorted(work.iterdir()):
            if p.is_dir() and _SHARD_DIR.match(p.name):
                j = _read_json(p / "journal.json")
                if j and j["parts"]:
                    out.append((p, j))
        return out

    def _committed_images(self) -> pa.Table:
        """The committed images table (read once per generation)."""
        if self._committed is None:
            path = self.root / IMAGES
            self._committed = pq.read_table(path) if self.generation and path.exists() \
                else IMAGES_SCHEMA.empty_table()
        return self._committed

    def _committed_rows(self) -> np.ndarray:
        return self._committed_images().column("row_id").to_numpy() if self.generation else np.empty(0, np.int64)

    def _image_versions(self, journals: list[tuple[Path, dict[str, Any]]],
                        with_predictions: bool) -> pa.Table | pd.DataFrame:
        """Every stored version of every image: the committed table first, then journal chunks in order.

        Without predictions: a DataFrame (row_id, image_id, code). With: the full Arrow table.
        """
        columns = None if with_predictions else ["row_id", "image_id", "label"]
        tables = [self._committed_images().select(columns) if columns else self._committed_images()]
        for folder, j in journals:
            tables += [pq.read_table(folder / p["images"], columns=columns) for p in j["parts"]]
        table = pa.concat_tables(tables)
        if with_predictions:
            return table
        return pd.DataFrame({"row_id": table.column("row_id").to_numpy(),
                             "image_id": table.column("image_id").to_numpy(zero_copy_only=False),
                             "code": _label_code(table.column("label").to_pandas())})

    def _assign_row_ids(self, recs: pd.DataFrame, versions: pd.DataFrame) -> np.ndarray:
        """Known images keep their row ids; new ones (sorted) take the free ids from next_row_id."""
        known = versions.drop_duplicates("image_id").set_index("image_id")["row_id"]
        ids = recs["image_id"].map(known)
        new = ids.isna().to_numpy()
        base = int(self.manifest["next_row_id"])
        used = np.unique(versions["row_id"].to_numpy())
        used = used[used >= base]
        free = np.setdiff1d(np.arange(base, base + int(new.sum()) + len(used), dtype=np.int64), used)
        out = ids.to_numpy(dtype=np.float64, na_value=np.nan)
        result = np.empty(len(recs), np.int64)
        result[~new] = out[~new].astype(np.int64)
        result[new] = free[: int(new.sum())]
        return result

    def _done_rows(self, w: _Writer, layer: str, journals: list[tuple[Path, dict[str, Any]]]) -> np.ndarray:
        """Rows that already hold ``layer``: committed (when the layer is) or in a journal."""
        rows = [_part_layer_rows(folder, p, layer) for folder, j in journals for p in j["parts"]
                if layer in p["layers"]]
        if layer in self.manifest["layers"]:
            rows.append(w.committed_rows)
        return np.unique(np.concatenate(rows)) if rows else np.empty(0, np.int64)

    # ------------------------------------------------------------------------ write_part ---

    def write_part(self, shard: int, chunk: pd.DataFrame, layers: Mapping[str, Mapping[str, Any]],
                   predictions: Mapping[str, Any]) -> None:
        """Write one chunk of this shard (see the module docstring); crash-safe at every step.

        ``layers``: {name: {"max": (N, C), "mean": (N, C), "argmax": (N, C) int (flat y*W+x),
        "hw": (H, W)}}; ``predictions``: {"prediction": (N,), "top5_ids": (N, m), "top5_scores":
        (N, m) softmax, "true_score": (N,) pre-softmax score of the label, NaN when unlabelled}.
        A layer's rows that are already stored are skipped.
        """
        w = self._writers.get(shard)
        if w is None:
            raise PipelineError(f"call store.plan(records, layers, shard={shard}, ...) before write_part.")
        rows = chunk["row_id"].to_numpy(np.int64)
        n = len(rows)
        if n == 0:
            return
        at = np.searchsorted(w.planned, rows).clip(max=max(len(w.planned) - 1, 0))
        if len(w.planned) == 0 or not np.array_equal(w.planned[at], rows):
            raise PipelineError("write_part got rows that are not in this shard's plan: "
                                "write the chunks that plan.chunks() yields.")
        order = np.argsort(rows, kind="stable")
        rows = rows[order]
        checked = {layer: self._check_layer_data(w, layer, data, n) for layer, data in layers.items()}
        images = self._images_chunk(chunk.iloc[order], predictions, order, n)
        seq = w.journal["parts"][-1]["seq"] + 1 if w.journal["parts"] else 0
        entry: dict[str, Any] = {"seq": seq, "n": n, "images": f"images-{seq:05d}.parquet", "layers": {}}
        dtype = DTYPES[self.dtype]
        topk = dict(w.topk)
        done = dict(w.done)
        shapes: dict[str, dict[str, Any]] = {}
        for layer, (maxv, meanv, argmax, hw) in checked.items():
            if layer not in done:
                done[layer] = self._done_rows(w, layer, self._journals())
            keep = ~np.isin(rows, done[layer])
            if not keep.any():
                continue
            sel = order[keep]
            maxs, means, am = maxv[sel].astype(dtype), meanv[sel].astype(dtype), argmax[sel].astype(np.int32)
            name = part_name(w.generation, w.shard, w.num_shards, seq)
            write_parquet_atomic(part_table(rows[keep], maxs, means, am, dtype),
                                 w.folder / layer_dirname(layer) / name)
            running = dict(topk.get(layer, {}))
            for stat, block in (("max", maxs), ("mean", means)):
                prev = running.get(stat)
                floor = tk.floor_of(prev, self.top_k) if prev is not None else None
                new = tk.chunk_topk(block.astype(np.float32), rows[keep], am, self.top_k, floor)
                running[stat] = tk.merge([prev, new], self.top_k) if prev is not None else new
            topk[layer] = running
            shapes[layer] = {"channels": int(maxv.shape[1]), "hw": list(hw)}
            entry["layers"][layer] = {"file": f"{layer_dirname(layer)}/{name}", "n": int(keep.sum()),
                                      "rows": None if keep.all() else rows[keep].tolist()}
            done[layer] = np.union1d(done[layer], rows[keep])
        crash_point("part_written")
        write_parquet_atomic(images, w.folder / entry["images"])
        state = f"state-{seq:05d}.npz"
        state_layers = sorted(topk)
        arrays: dict[str, np.ndarray] = {}
        for i, layer in enumerate(state_layers):
            for stat in VALUE_STATS:
                arrays.update(topk[layer][stat].arrays(f"L{i}_{stat}"))
        tmp = tmp_path(w.folder / state)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, w.folder / state)
        journal = {**w.journal, "parts": [*w.journal["parts"], entry], "layers": {**w.journal["layers"], **shapes},
                   "state": state, "state_layers": state_layers}
        atomic_write_json(w.folder / "journal.json", journal)
        crash_point("journal_written")
        old_state = w.journal.get("state")
        w.journal, w.topk, w.done = journal, topk, done
        w.known_layers.update(shapes)
        if old_state and old_state != state:
            (w.folder / old_state).unlink(missing_ok=True)

    def _check_layer_data(self, w: _Writer, layer: str, data: Mapping[str, Any],
                          n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
        """Validate one layer's arrays against each other and against what the store already holds."""
        if not isinstance(layer, str) or not layer:
            raise PipelineError(f"layer names must be non-empty strings, got {layer!r}.")
        try:
            maxv, meanv, argmax = (np.asarray(data[k]) for k in ("max", "mean", "argmax"))
            hw = tuple(int(v) for v in data["hw"])
        except KeyError as e:
            raise PipelineError(f"layer {layer!r}: write_part needs 'max', 'mean', 'argmax' and 'hw' "
                                f"(missing {e}).") from None
        if maxv.ndim != 2 or maxv.shape[0] != n or meanv.shape != maxv.shape or argmax.shape != maxv.shape:
            raise PipelineError(f"layer {layer!r}: max, mean and argmax must all be ({n}, C) arrays, got "
                                f"{maxv.shape}, {meanv.shape}, {argmax.shape}.")
        if len(hw) != 2 or min(hw) < 1:
            raise PipelineError(f"layer {layer!r}: hw must be (H, W) with H, W >= 1, got {data['hw']}.")
        if argmax.size and (argmax.min() < 0 or argmax.max() >= hw[0] * hw[1]):
            raise PipelineError(f"layer {layer!r}: argmax must be a flat index y*W+x in 0..{hw[0] * hw[1] - 1}.")
        if not (np.isfinite(maxv).all() and np.isfinite(meanv).all()):
            raise PipelineError(f"layer {layer!r}: the activations contain NaN or infinite values.")
        known = w.known_layers.get(layer)
        if known and (known["channels"] != maxv.shape[1] or list(known["hw"]) != list(hw)):
            raise PipelineError(f"layer {layer!r} has {known['channels']} channels of {known['hw'][0]}x"
                                f"{known['hw'][1]} in the store but {maxv.shape[1]} of {hw[0]}x{hw[1]} were "
                                "given: the model changed; use a store for the new model key.")
        return maxv, meanv, argmax, hw

    @staticmethod
    def _images_chunk(chunk: pd.DataFrame, predictions: Mapping[str, Any], order: np.ndarray,
                      n: int) -> pa.Table:
        """The chunk's rows of the images table, predictions validated and put in row order."""
        try:
            pred = np.asarray(predictions["prediction"])
            ids = np.asarray(predictions["top5_ids"])
            scores = np.asarray(predictions["top5_scores"])
            true = np.asarray(predictions["true_score"], np.float32)
        except KeyError as e:
            raise PipelineError("predictions need prediction, top5_ids, top5_scores and true_score "
                                f"(missing {e}).") from None
        if pred.shape != (n,) or true.shape != (n,) or ids.ndim != 2 or ids.shape[0] != n or scores.shape != ids.shape:
            raise PipelineError(f"predictions must be prediction ({n},), top5_ids/top5_scores ({n}, m) and "
                                f"true_score ({n},); got {pred.shape}, {ids.shape}, {scores.shape}, {true.shape}.")
        return images_table(chunk.reset_index(drop=True), pred[order], ids[order], scores[order], true[order])

    # -------------------------------------------------------------------------- finalize ---

    def finalize(self, records: pd.DataFrame) -> dict[str, Any]:
        """Commit the next generation (see the module docstring); a no-op when nothing changed.

        Returns counts: generation, changed, n_images, added, removed, and per layer the rows,
        parts, compacted parts and channels whose top-K was recomputed.
        """
        t0 = time.perf_counter()
        recs = normalize_records(records)
        work = self.root / WORK
        shutil.rmtree(work / "commit", ignore_errors=True)
        journals = self._journals()
        versions = self._image_versions(journals, with_predictions=True)
        images, stats = self._final_images(recs, versions)
        committed = self._committed_images()
        if not journals and _same_metadata(images, committed):
            self._writers.clear()
            return {"generation": self.generation, "changed": False, "n_images": len(images),
                    "added": 0, "removed": 0, "seconds": round(time.perf_counter() - t0, 3), "layers": {}}
        gen = self.generation + 1
        stage = work / "commit"
        live = images.column("row_id").to_numpy()
        moves: list[tuple[Path, Path]] = []
        deletes: list[Path] = []
        layer_info: dict[str, Any] = {}
        stats["layers"] = {}
        names = sorted(set(self.manifest["layers"]) | {l for _, j in journals for l in j["layers"]})
        for layer in names:
            info, lmoves, ldeletes, lstats = self._finalize_layer(layer, gen, live, journals, stage)
            layer_info[layer] = info
            moves += lmoves
            deletes += ldeletes
            stats["layers"][layer] = lstats
        write_parquet_atomic(images, stage / IMAGES, row_group_size=8192)
        moves.append((stage / IMAGES, self.root / IMAGES))
        next_row = max(int(self.manifest["next_row_id"]),
                       int(pc.max(versions.column("row_id")).as_py() or 0) + 1 if versions.num_rows else 0)
        manifest = {**self.manifest, "generation": gen, "n_images": int(len(live)),
                    "next_row_id": next_row, "layers": layer_info,
                    "committed": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        def rel(p: Path) -> str:
            return p.relative_to(self.root).as_posix()

        commit = {"generation": gen, "moves": [[rel(a), rel(b)] for a, b in moves],
                  "deletes": [rel(p) for p in deletes], "manifest": manifest,
                  "layer_dirs": [layer_dirname(l) for l in layer_info]}
        crash_point("finalize_staged")
        atomic_write_json(work / "commit.json", commit)
        crash_point("finalize_committed")
        _apply_pending_commit(self.root)
        self.manifest = manifest
        self._writers.clear()
        self._reset_caches()
        stats.update({"generation": gen, "changed": True, "n_images": int(len(live)),
                      "seconds": round(time.perf_counter() - t0, 3)})
        return stats

    def _final_images(self, recs: pd.DataFrame, versions: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
        """The next images table: for each record the newest stored version with the same label."""
        vdf = pd.DataFrame({"image_id": versions.column("image_id").to_numpy(zero_copy_only=False),
                            "code": _label_code(versions.column("label").to_pandas()),
                            "idx": np.arange(versions.num_rows)})
        want = pd.DataFrame({"image_id": recs["image_id"].to_numpy(), "code": _label_code(recs["label"]),
                             "rec": np.arange(len(recs))})
        hit = want.merge(vdf, on=["image_id", "code"], how="left").groupby("rec")["idx"].max()
        idx = hit.reindex(np.arange(len(recs))).to_numpy()
        missing = np.isnan(idx)
        if missing.any():
            known = set(vdf["image_id"])
            gone = recs[missing]
            relabelled = gone["image_id"].isin(known).to_numpy()
            example = gone["path"].iloc[0]
            if relabelled.all():
                raise PipelineError(f"{int(missing.sum())} images changed label since they were extracted "
                                    f"(e.g. {example}): {EXTRACT_HINT} again before finalize.")
            raise PipelineError(f"{int((~relabelled).sum())} of {len(recs)} images have not been extracted "
                                f"(e.g. {example}): {EXTRACT_HINT} for every shard before finalize.")
        table = versions.take(pa.array(idx.astype(np.int64)))
        rows = table.column("row_id").to_numpy()
        order = np.argsort(rows, kind="stable")
        recs_sorted = recs.iloc[order].reset_index(drop=True)
        table = table.take(pa.array(order))
        table = table.set_column(table.schema.get_field_index("path"), "path",
                                 pa.array(recs_sorted["path"].tolist(), pa.string()))
        table = table.set_column(table.schema.get_field_index("split"), "split",
                                 pa.array(recs_sorted["split"].tolist(), pa.string()))
        committed = self._committed_rows()
        new_rows = table.column("row_id").to_numpy()
        stats = {"added": int((~np.isin(new_rows, committed)).sum()),
                 "removed": int((~np.isin(committed, new_rows)).sum())}
        return table, stats

    def _finalize_layer(self, layer: str, gen: int, live: np.ndarray,
                        journals: list[tuple[Path, dict[str, Any]]], stage: Path
                        ) -> tuple[dict[str, Any], list[tuple[Path, Path]], list[Path], dict[str, Any]]:
        """Stage one layer's next parts, top-K and manifest; return (info, moves, deletes, stats)."""
        ldir = layer_dirname(layer)
        dest = self.root / ldir
        committed_meta = self._layer_manifest(layer) if layer in self.manifest["layers"] else None
        # Every (row, layer) has one source: the last journal part that wrote it, else the committed parts.
        jparts = [(folder, p) for folder, j in journals for p in j["parts"] if layer in p["layers"]]
        jrows = [_part_layer_rows(folder, p, layer) for folder, p in jparts]
        if jrows:
            allr = np.concatenate(jrows)
            pidx = np.concatenate([np.full(len(r), i) for i, r in enumerate(jrows)])
            journal_rows, first = np.unique(allr[::-1], return_index=True)
            owner = pidx[len(allr) - 1 - first]
        else:
            journal_rows, owner = np.empty(0, np.int64), np.empty(0, np.int64)
        committed_rows = self._committed_rows() if committed_meta else np.empty(0, np.int64)
        dropped_committed = np.union1d(np.setdiff1d(committed_rows, live),
                                       np.intersect1d(committed_rows, journal_rows))
        covered = np.union1d(np.setdiff1d(committed_rows, dropped_committed),
                             np.intersect1d(journal_rows, live))
        lacking = np.setdiff1d(live, covered)
        if len(lacking):
            raise PipelineError(f"layer {layer!r} lacks {len(lacking)} of {len(live)} images: {EXTRACT_HINT} "
                                f"with layer {layer} for every shard before finalize.")
        moves: list[tuple[Path, Path]] = []
        deletes: list[Path] = []
        final_parts: list[dict[str, Any]] = []
        read_paths: list[Path] = []
        compacted = 0
        for i, part in enumerate(committed_meta["parts"] if committed_meta else []):
            path = dest / part["file"]
            lo, hi = np.searchsorted(dropped_committed, [part["min_row"], part["max_row"] + 1])
            if lo == hi:
                final_parts.append(part)
                read_paths.append(path)
                continue
            table = pq.read_table(path)
            keep = ~np.isin(table.column("row_id").to_numpy(), dropped_committed)
            deletes.append(path)
            compacted += 1
            if keep.any():
                name = compacted_name(gen, i)
                staged = stage / ldir / name
                write_parquet_atomic(table.filter(pa.array(keep)), staged)
                moves.append((staged, dest / name))
                final_parts.append(_part_entry(name, table.column("row_id").to_numpy()[keep]))
                read_paths.append(staged)
        dropped_by_dir: dict[Path, list[np.ndarray]] = {}
        for i, (folder, p) in enumerate(jparts):
            r = jrows[i]
            keep = np.isin(r, live) & (owner[np.searchsorted(journal_rows, r)] == i)
            dropped_by_dir.setdefault(folder, []).append(r[~keep])
            e = p["layers"][layer]
            src = folder / e["file"]
            name = Path(e["file"]).name
            if not keep.any():
                continue
            if not keep.all():
                table = pq.read_table(src)
                src = stage / ldir / name
                write_parquet_atomic(table.filter(pa.array(keep)), src)
            moves.append((src, dest / name))
            final_parts.append(_part_entry(name, r[keep]))
            read_paths.append(src)
        channels, hw = self._layer_shape(layer, journals)
        unsafe = np.zeros(channels, bool)
        merged: dict[str, tk.TopK] = {}
        for stat in VALUE_STATS:
            sources = []
            if committed_meta:
                top, lost = tk.drop_rows(self._load_topk(layer)[stat], dropped_committed, self.top_k)
                sources.append(top)
                unsafe |= lost
            for folder, j in journals:
                if layer not in j.get("state_layers", []):
                    continue
                with np.load(folder / j["state"]) as z:
                    top = tk.TopK.from_arrays(z, f"L{j['state_layers'].index(layer)}_{stat}")
                drops = np.sort(np.concatenate(dropped_by_dir.get(folder, [np.empty(0, np.int64)])))
                top, lost = tk.drop_rows(top, drops, self.top_k)
                sources.append(top)
                unsafe |= lost
            nonempty = [s for s in sources if s.values.shape[1]]
            merged[stat] = tk.merge(nonempty, self.top_k) if nonempty else tk.TopK.empty(channels)
        recomputed = np.flatnonzero(unsafe)
        if len(recomputed):
            merged = self._recompute_topk(merged, recomputed, read_paths)
        merged = {s: tk.trim(t) for s, t in merged.items()}
        n_rows = int(sum(p["n"] for p in final_parts))
        info = {"dir": ldir, "channels": channels, "hw": list(hw), "dtype": self.dtype, "n_rows": n_rows,
                "state": make_key(layer=layer, parts=[[p["file"], p["n"]] for p in final_parts])}
        meta_stage = stage / META / ldir
        meta_stage.mkdir(parents=True, exist_ok=True)
        arrays = {**merged["max"].arrays("max"), **merged["mean"].arrays("mean")}
        with open(meta_stage / "topk.npz", "wb") as f:
            np.savez(f, **arrays)
        atomic_write_json(meta_stage / "manifest.json", {"layer": layer, **info, "top_k": self.top_k,
                                                         "generation": gen, "parts": final_parts})
        meta_dest = self._meta_dir(layer)
        moves += [(meta_stage / "topk.npz", meta_dest / "topk.npz"),
                  (meta_stage / "manifest.json", meta_dest / "manifest.json")]
        stats = {"n_rows": n_rows, "parts": len(final_parts), "compacted_parts": compacted,
                 "topk_recomputed_channels": int(len(recomputed))}
        return info, moves, deletes, stats

    def _layer_shape(self, layer: str,
                     journals: list[tuple[Path, dict[str, Any]]]) -> tuple[int, tuple[int, int]]:
        info = self.manifest["layers"].get(layer)
        for _, j in journals:
            info = info or j["layers"].get(layer)
        return int(info["channels"]), (int(info["hw"][0]), int(info["hw"][1]))

    def _recompute_topk(self, merged: dict[str, tk.TopK], channels: np.ndarray,
                        paths: list[Path]) -> dict[str, tk.TopK]:
        """Replace the top-K of ``channels`` by one recomputed from the data of the final parts."""
        fresh: dict[str, list[tk.TopK]] = {s: [] for s in VALUE_STATS}
        arg_cols = [f"argmax_{c}" for c in channels]
        for path in paths:
            f = pq.ParquetFile(path)
            for stat in VALUE_STATS:
                t = f.read(columns=["row_id", *[f"{stat}_{c}" for c in channels], *arg_cols])
                block = np.column_stack([t.column(f"{stat}_{c}").to_numpy().astype(np.float32) for c in channels])
                am = np.column_stack([t.column(a).to_numpy() for a in arg_cols])
                fresh[stat].append(tk.chunk_topk(block, t.column("row_id").to_numpy(), am, self.top_k))
        out = {}
        for stat in VALUE_STATS:
            cur = merged[stat]
            parts = [f for f in fresh[stat] if f.values.shape[1]]
            new = tk.merge(parts, self.top_k) if parts else tk.TopK.empty(len(channels))
            width = max(cur.values.shape[1], new.values.shape[1])
            top = tk.TopK(np.full((cur.channels, width), -np.inf, np.float32),
                          np.full((cur.channels, width), tk.PAD_ROW, np.int64),
                          np.zeros((cur.channels, width), np.int32))
            w = cur.values.shape[1]
            top.values[:, :w], top.rows[:, :w], top.argmax[:, :w] = cur.values, cur.rows, cur.argmax
            top.values[channels], top.rows[channels], top.argmax[channels] = -np.inf, tk.PAD_ROW, 0
            w = new.values.shape[1]
            top.values[channels, :w], top.rows[channels, :w], top.argmax[channels, :w] = \
                new.values, new.rows, new.argmax
            out[stat] = top
        return out

    # --------------------------------------------------------------------------- reading ---

    def layers(self) -> list[str]:
        """Names of the committed layers."""
        return sorted(self.manifest["layers"])

    def _check_layer(self, layer: str) -> dict[str, Any]:
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
        return int(self._check_layer(layer)["channels"])

    def hw(self, layer: str) -> tuple[int, int]:
        """Spatial size (H, W) of ``layer``'s output (argmax = y*W + x)."""
        h, w = self._check_layer(layer)["hw"]
        return int(h), int(w)

    def _check_channel(self, layer: str, channel: int) -> int:
        c = self.channels(layer)
        if not isinstance(channel, (int, np.integer)) or not 0 <= int(channel) < c:
            raise PipelineError(f"channel {channel} is out of range for layer {layer!r}, which has {c} "
                                f"channels: use 0..{c - 1}.")
        return int(channel)

    @staticmethod
    def _check_by(by: str) -> None:
        if by not in VALUE_STATS:
            raise PipelineError(f"by must be 'max' or 'mean', got {by!r}.")

    @staticmethod
    def _check_k(k: int) -> int:
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise PipelineError(f"k must be a positive integer, got {k!r}.")
        return int(k)

    def images(self) -> pd.DataFrame:
        """The images table (row_id, image_id, path, label, split, prediction, top5_*, true_score)."""
        return self._committed_images().to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get).astype(
            {"row_id": np.int64})

    def pooled(self, layer: str, image_ids: Sequence[str]) -> np.ndarray | None:
        """Spatial means (N,C) of ``layer`` for ``image_ids`` (the ``mean_*`` columns), in that order;
        None when the store misses one of the images."""
        images = self.images()
        row_of = dict(zip(images["image_id"].astype(str), images["row_id"]))
        if any(i not in row_of for i in image_ids):
            return None
        columns = [f"mean_{c}" for c in range(self.channels(layer))]
        table = ds.dataset(self.root / layer_dirname(layer), format="parquet").to_table(columns=["row_id", *columns])
        position = pd.Series(np.arange(table.num_rows), index=table.column("row_id").to_numpy())
        rows = [row_of[i] for i in image_ids]
        if not position.index.is_unique or any(r not in position.index for r in rows):
            return None
        idx = position.loc[rows].to_numpy()
        return np.stack([table.column(c).to_numpy().astype(np.float32)[idx] for c in columns], axis=1)

    def _image_arrays(self) -> dict[str, pa.Array]:
        """row_id, image_id, path, label of every image as single-chunk Arrow arrays (cached)."""
        if self._img is None:
            t = self._committed_images().select(["row_id", "image_id", "path", "label"])
            self._img = {name: t.column(name).combine_chunks() for name in t.column_names}
            self._img_rows = self._img["row_id"].to_numpy()
        return self._img

    def _image_info(self, rows: np.ndarray) -> dict[str, Any]:
        """image_id, path, label of ``rows``. Until the whole table is needed, only the row groups
        of images.parquet that hold the rows are read (their row_id statistics say which) and kept,
        so a first query on a large store does not load every image's path."""
        if self._img is None and self.generation:
            table = self._images_row_groups(rows)
        else:
            table = None
        if table is None:
            cols, src_rows = self._image_arrays(), self._img_rows
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

    def _frame(self, rows: np.ndarray, **columns: Any) -> pd.DataFrame:
        """A result table: row_id, image_id, path, label, then ``columns``."""
        rows = np.asarray(rows, np.int64)
        return pd.DataFrame({"row_id": rows, **self._image_info(rows), **columns})

    def _row_of(self, image: str) -> int:
        """The row_id of an image given by image id or path: a linear scan for the first lookups
        (cheap for one query), then a hash table built once for the rest."""
        arrays = self._image_arrays()
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

    def _layer_manifest(self, layer: str) -> dict[str, Any]:
        m = self._layer_manifests.get(layer)
        if m is None:
            m = read_manifest(self._meta_dir(layer))
            if m is None:
                raise PipelineError(f"the store's files for layer {layer!r} are missing: delete {self.root} "
                                    f"and {EXTRACT_HINT}.")
            self._layer_manifests[layer] = m
        return m

    def _load_topk(self, layer: str) -> dict[str, tk.TopK]:
        t = self._topk_cache.get(layer)
        if t is None:
            with np.load(self._meta_dir(layer) / "topk.npz") as z:
                t = {s: tk.TopK.from_arrays(z, s) for s in VALUE_STATS}
            self._topk_cache[layer] = t
        return t

    def _parts(self, layer: str) -> PartFiles:
        p = self._parts_cache.get(layer)
        if p is None:
            ldir = self.root / layer_dirname(layer)
            p = PartFiles([ldir / part["file"] for part in self._layer_manifest(layer)["parts"]])
            self._parts_cache[layer] = p
        return p

    def topk(self, layer: str, channel: int, k: int = 5, by: str = "max") -> pd.DataFrame:
        """The ``k`` images that fire ``layer``'s ``channel`` most (by spatial max or mean).

        A lookup in the stored top-K; a column scan when ``k`` exceeds it. Columns: row_id, image_id,
        path, label, value, y, x (position of the channel's spatial max in that image).
        """
        self._check_layer(layer)
        c = self._check_channel(layer, channel)
        self._check_by(by)
        k = self._check_k(k)
        top = self._load_topk(layer)[by]
        width = top.values.shape[1]
        if k <= width or width < self.top_k:
            rows, vals, am = top.rows[c, :k], top.values[c, :k], top.argmax[c, :k]
        else:
            t = self._parts(layer).read(["row_id", f"{by}_{c}", f"argmax_{c}"])
            all_rows = t.column("row_id").to_numpy()
            values = t.column(f"{by}_{c}").to_numpy().astype(np.float32)
            idx = tk.column_topk(values, all_rows, k)
            rows, vals, am = all_rows[idx], values[idx], t.column(f"argmax_{c}").to_numpy()[idx]
        w = self.hw(layer)[1]
        return self._frame(rows, value=vals, y=am // w, x=am % w)

    def top_neurons(self, layer: str, image: str, k: int = 10, by: str = "max") -> pd.DataFrame:
        """The ``k`` channels of ``layer`` that ``image`` (id or path) excites most: channel, value, y, x."""
        self._check_layer(layer)
        self._check_by(by)
        k = self._check_k(k)
        row = self._row_of(image)
        c = self.channels(layer)
        t = self._parts(layer).read_row(row, [*column_names(by, c), *column_names("argmax", c)])
        if t is None:
            raise PipelineError(f"image {image!r} has no activations for layer {layer!r}.")
        values = np.array([t.column(f"{by}_{j}")[0].as_py() for j in range(c)], np.float32)
        am = np.array([t.column(f"argmax_{j}")[0].as_py() for j in range(c)], np.int64)
        idx = tk.column_topk(values, np.arange(c), min(k, c))
        w = self.hw(layer)[1]
        return pd.DataFrame({"channel": idx, "value": values[idx], "y": am[idx] // w, "x": am[idx] % w})

    # ------------------------------------------------------------------------- indexes ---

    def _index_dir(self, layer: str, kind: str, metric: str) -> Path:
        return self._meta_dir(layer) / search.index_dirname(kind, metric)

    def build_index(self, layer: str, kind: str = "flat", metric: str = "ip", **params: Any) -> dict[str, Any]:
        """Build the FAISS index of ``layer``'s mean vectors unless an up-to-date one exists.

        kind: "flat" (exact; params ``prescan_min_rows``, ``prescan_shards``), "ivf" (``nlist``,
        ``train_size``, ``refine``, ``target_recall``) or "hnsw" (``M``, ``ef_construction``, ``refine``,
        ``target_recall``); metric "ip" or "cosine". Approximate kinds also build the flat index of
        the same metric (their re-rank reads its vectors). Returns the index manifest plus ``built``.
        """
        info = self._check_layer(layer)
        search.check_kind_metric(kind, metric)
        if info["n_rows"] == 0:
            raise PipelineError(f"layer {layer!r} has no rows to index: {EXTRACT_HINT} first.")
        folder = self._index_dir(layer, kind, metric)
        params = {k: v for k, v in sorted(params.items())}
        old = read_manifest(folder)
        if old and old.get("state") == info["state"] and old.get("params") == params:
            return {**old, "built": False}
        base = {"layer": layer, "state": info["state"], "params": params, "generation": self.generation}
        if kind == "flat":
            built = self._build_flat(layer, folder, metric, base, params)
        else:
            self.build_index(layer, "flat", metric)
            flat = self._flat(layer, metric)
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
        c = self.channels(layer)
        cols = ["row_id", *column_names("mean", c)]

        def blocks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for t in self._parts(layer).iter_read(cols):
                block = np.empty((t.num_rows, c), np.float32)
                for j in range(c):
                    block[:, j] = t.column(j + 1).to_numpy()
                yield t.column(0).to_numpy(), block

        extra = {k: params[k] for k in ("prescan_min_rows", "prescan_shards") if k in params}
        unknown = set(params) - set(extra)
        if unknown:
            raise PipelineError(f"unknown flat index parameter(s) {', '.join(sorted(unknown))}: "
                                "use prescan_min_rows, prescan_shards.")
        n = int(self._check_layer(layer)["n_rows"])
        return search.build_flat(folder, blocks(), n, c, metric, base, **extra)

    def _flat(self, layer: str, metric: str) -> search.FlatIndex:
        key = (layer, metric)
        idx = self._flat_cache.get(key)
        if idx is None:
            folder = self._fresh_index(layer, "flat", metric)
            idx = self._flat_cache[key] = search.FlatIndex(folder)
        return idx

    def _fresh_index(self, layer: str, kind: str, metric: str) -> Path:
        folder = self._index_dir(layer, kind, metric)
        m = read_manifest(folder)
        state = self._check_layer(layer)["state"]
        what = "exact (flat)" if kind == "flat" else kind
        if m is None:
            raise PipelineError(f"no {what} {metric} index for layer {layer!r}: {INDEX_HINT} "
                                f"(store.build_index({layer!r}, kind={kind!r}, metric={metric!r})).")
        if m.get("state") != state:
            raise PipelineError(f"the {what} {metric} index of layer {layer!r} is out of date (the store "
                                f"changed since it was built): {INDEX_HINT}.")
        return folder

    def _searcher(self, layer: str, metric: str | None, exact: bool,
                  prefer: str) -> tuple[Any, search.FlatIndex, str]:
        """The exact or approximate search function for ``layer``, its flat index and its metric
        (resolved once per store state)."""
        key = (layer, metric, exact, prefer)
        if key not in self._searchers:
            self._searchers[key] = self._find_searcher(layer, metric, exact, prefer)
        return self._searchers[key]

    def _find_searcher(self, layer: str, metric: str | None, exact: bool,
                       prefer: str) -> tuple[Any, search.FlatIndex, str]:
        kinds = ["flat"] if exact else ["ivf", "hnsw"]
        metrics = [metric] if metric else [prefer, *[m for m in search.METRICS if m != prefer]]
        if metric:
            search.check_kind_metric(kinds[0], metric)
        state = self._check_layer(layer)["state"]
        for m in metrics:
            for kind in kinds:
                man = read_manifest(self._index_dir(layer, kind, m))
                if man and man.get("state") == state:
                    flat = self._flat(layer, m)
                    if kind == "flat":
                        return flat.search, flat, m
                    key = (layer, kind, m)
                    if key not in self._approx_cache:
                        self._approx_cache[key] = search.ApproxSearch.load(self._index_dir(layer, kind, m), flat)
                    return self._approx_cache[key].search, flat, m
        # Nothing usable: raise the precise error for the first choice.
        self._fresh_index(layer, kinds[0], metrics[0])
        raise PipelineError(f"no approximate index for layer {layer!r}: {INDEX_HINT} with kind=ivf or hnsw.")

    def direction(self, layer: str, vector: Any, k: int = 10, metric: str | None = None,
                  exact: bool = True) -> pd.DataFrame:
        """The ``k`` images whose mean vector scores highest along ``vector`` (IP or cosine).

        Uses the exact index (or an approximate one with ``exact=False``); ``metric`` None picks an
        up-to-date index, preferring inner product. Columns: row_id, image_id, path, label, score.
        """
        k = self._check_k(k)
        fn, flat, m = self._searcher(layer, metric, exact, prefer="ip")
        q = search.prepare_query(vector, self.channels(layer), m)
        pos, scores = fn(q, k)
        return self._frame(flat.rows[pos], score=scores)

    def neighbours(self, layer: str, image: str, k: int = 10, metric: str | None = None,
                   exact: bool = True) -> pd.DataFrame:
        """The ``k`` images most similar to ``image`` (id or path) in ``layer``, excluding itself.

        ``metric`` None picks an up-to-date index, preferring cosine. Columns as in ``direction``.
        """
        k = self._check_k(k)
        row = self._row_of(image)
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
        return self._frame(flat.rows[pos], score=scores)

    # ---------------------------------------------------------------------- class means ---

    def class_direction(self, layer: str, class_a: int, class_b: int) -> np.ndarray:
        """Mean vector of class ``class_a``'s images minus that of ``class_b`` (float64, (C,)).

        Per-class sums come from one pass over the mean columns and are cached in ``.meta`` until the
        store changes.
        """
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
        """(labels, per-label sums of the mean vectors, counts), from one pass over the mean columns."""
        info = self._check_layer(layer)
        cached = self._class_cache.get(layer)
        if cached is not None:
            return cached
        path = self._meta_dir(layer) / "class_sums.npz"
        key = make_key(state=info["state"], generation=self.generation)
        if path.exists():
            with np.load(path) as z:
                if str(z["key"]) == key:
                    self._class_cache[layer] = (z["labels"], z["sums"], z["counts"])
                    return self._class_cache[layer]
        arrays = self._image_arrays()
        img_rows = self._img_rows
        img_labels = _label_code(arrays["label"].to_pandas())
        c = int(info["channels"])
        acc: dict[int, np.ndarray] = {}
        cnt: dict[int, int] = {}
        for t in self._parts(layer).iter_read(["row_id", *column_names("mean", c)]):
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


# ------------------------------------------------------------------------------- helpers ---

def _short_list(items: list[Any], n: int = 20) -> str:
    return ", ".join(map(str, items[:n])) + (", ..." if len(items) > n else "") if items else "none"


def _part_entry(name: str, rows: np.ndarray) -> dict[str, Any]:
    return {"file": name, "n": int(len(rows)), "min_row": int(rows.min()), "max_row": int(rows.max())}


def _part_layer_rows(folder: Path, part: dict[str, Any], layer: str) -> np.ndarray:
    """Row ids a journal part wrote for ``layer`` (listed when partial, else the chunk's rows)."""
    rows = part["layers"][layer].get("rows")
    if rows is not None:
        return np.asarray(rows, np.int64)
    return pq.read_table(folder / part["images"], columns=["row_id"]).column(0).to_numpy()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _same_metadata(new: pa.Table, old: pa.Table) -> bool:
    """Whether two images tables hold the same rows and metadata (predictions are not compared)."""
    cols = ["row_id", "image_id", "path", "label", "split"]
    return new.num_rows == old.num_rows and new.select(cols).equals(old.select(cols))


def _clean_shard_dir(folder: Path, journal: dict[str, Any]) -> None:
    """Delete everything in a shard's work folder that its journal does not list."""
    if not folder.is_dir():
        return
    keep = {"journal.json", JOB_FILE}
    if journal.get("state"):
        keep.add(journal["state"])
    for p in journal["parts"]:
        keep.add(p["images"])
        keep.update(e["file"] for e in p["layers"].values())
    for path in sorted(folder.rglob("*"), reverse=True):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in keep:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _apply_pending_commit(root: Path) -> None:
    """Roll a committed finalize forward: moves, deletes, store manifest, then drop the work folder.

    Every step is idempotent, so a finalize killed half way through is completed by the next open.
    """
    work = root / WORK
    commit = _read_json(work / "commit.json")
    if commit is None:
        return
    for src, dst in commit["moves"]:
        s, d = root / src, root / dst
        if s.exists():
            d.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):     # another process rolled it forward first
                os.replace(s, d)
    for rel in commit["deletes"]:
        (root / rel).unlink(missing_ok=True)
    for ldir in commit["layer_dirs"]:
        _sweep_layer_dir(root, ldir)
    crash_point("finalize_applying")
    atomic_write_json(root / STORE_MANIFEST, commit["manifest"])
    shutil.rmtree(work, ignore_errors=True)


def _sweep_layer_dir(root: Path, ldir: str) -> None:
    """Remove files in a layer's dataset folder that its manifest does not list (stray or temporary)."""
    m = read_manifest(root / META / ldir)
    folder = root / ldir
    if m is None or not folder.is_dir():
        return
    listed = {p["file"] for p in m["parts"]}
    for p in folder.iterdir():
        if p.is_file() and p.name not in listed:
            p.unlink(missing_ok=True)
