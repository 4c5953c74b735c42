"""Writing one shard of the next generation: planning what needs the model, then crash-safe parts.

* :func:`make_plan` compares the dataset's records with the committed store and with the journals
  of the unfinished generation, and returns this shard's records that still need the model: new
  images, images missing a requested layer, and images whose label changed (their ``true_score``
  needs the model). Row ids are assigned deterministically: committed and journaled images keep
  theirs, new image ids (sorted) take the free ids from ``next_row_id`` upward, so every shard and
  every resumed run assigns the same ids.
* :meth:`Plan.write` writes one chunk: layer parts and an images chunk into the shard's work
  folder (temporary file + ``os.replace`` each), the shard's running top-K, then the shard journal
  (its commit point). Anything not listed in a journal is deleted by the next plan.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache import atomic_write_json, read_manifest
from pipeline.errors import PipelineError
from pipeline.store import topk as tk
from pipeline.store.layout import (DTYPES, VALUE_STATS, WORK, crash_point, layer_dirname, part_name, tmp_path,
                                   write_parquet_atomic)
from pipeline.store.reader import StoreReader
from pipeline.store.records import label_code, normalize_records, shard_of
from pipeline.store.tables import images_table, part_table

SHARD_DIR = re.compile(r"^s(\d{3})of(\d{3})$")
JOB_FILE = "job.json"  # in a shard's work folder: the job that runs it
JOURNAL = "journal.json"

Journals = list[tuple[Path, dict[str, Any]]]


# ------------------------------------------------------------------------------ work folders ---

def work_dir(reader: StoreReader) -> Path:
    """The work folder of the generation after the reader's."""
    return reader.root / WORK / f"g{reader.generation + 1:06d}"


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing or half written."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def journals(reader: StoreReader) -> Journals:
    """(folder, journal) of every shard of the next generation that wrote a part, in a fixed order."""
    work = work_dir(reader)
    if not work.is_dir():
        return []
    out = []
    for p in sorted(work.iterdir()):
        if p.is_dir() and SHARD_DIR.match(p.name):
            j = read_json(p / JOURNAL)
            if j and j["parts"]:
                out.append((p, j))
    return out


def part_layer_rows(folder: Path, part: dict[str, Any], layer: str) -> np.ndarray:
    """Row ids a journal part wrote for ``layer`` (listed when partial, else the chunk's rows)."""
    rows = part["layers"][layer].get("rows")
    if rows is not None:
        return np.asarray(rows, np.int64)
    return pq.read_table(folder / part["images"], columns=["row_id"]).column(0).to_numpy()


def image_versions(reader: StoreReader, found: Journals, with_predictions: bool) -> pa.Table | pd.DataFrame:
    """Every stored version of every image: the committed table first, then journal chunks in order.

    Without predictions: a DataFrame (row_id, image_id, code). With: the full Arrow table.
    """
    columns = None if with_predictions else ["row_id", "image_id", "label"]
    tables = [reader.committed_images().select(columns) if columns else reader.committed_images()]
    for folder, j in found:
        tables += [pq.read_table(folder / p["images"], columns=columns) for p in j["parts"]]
    table = pa.concat_tables(tables)
    if with_predictions:
        return table
    return pd.DataFrame({"row_id": table.column("row_id").to_numpy(),
                         "image_id": table.column("image_id").to_numpy(zero_copy_only=False),
                         "code": label_code(table.column("label").to_pandas())})


def _clean_shard_dir(folder: Path, journal: dict[str, Any]) -> None:
    """Delete everything in a shard's work folder that its journal does not list."""
    if not folder.is_dir():
        return
    keep = {JOURNAL, JOB_FILE}
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


def _drop_stale_work(reader: StoreReader) -> None:
    """Remove work folders of generations other than the next one (left by an older store state)."""
    work = reader.root / WORK
    if not work.is_dir():
        return
    for p in work.iterdir():
        if p.is_dir() and p.name.startswith("g") and p != work_dir(reader):
            shutil.rmtree(p, ignore_errors=True)


# -------------------------------------------------------------------------------------- plan ---

@dataclass
class Plan:
    """The records of one shard that still need processing, with row ids, sorted by image id; writes
    their chunks with :meth:`write` until the store is finalized."""

    records: pd.DataFrame
    shard: int
    num_shards: int
    layers: list[str]
    n_records: int
    n_in_shard: int
    writer: ShardWriter = field(repr=False, compare=False)

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

    def write(self, chunk: pd.DataFrame, layers: Mapping[str, Mapping[str, Any]],
              predictions: Mapping[str, Any]) -> None:
        """Write one chunk of this plan; crash-safe at every step (see :meth:`ShardWriter.write`)."""
        self.writer.write(chunk, layers, predictions)


def make_plan(reader: StoreReader, records: pd.DataFrame, layers: Sequence[str], shard: int,
              num_shards: int, job: Mapping[str, Any] | None) -> Plan:
    """This shard's records that need the model, with stable row ids, and the writer of its chunks."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise PipelineError(f"shard must be in 0..{num_shards - 1} and num_shards >= 1 "
                            f"(got shard={shard}, num_shards={num_shards}).")
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise PipelineError("plan needs at least one layer to extract.")
    recs = normalize_records(records)
    _drop_stale_work(reader)
    folder = work_dir(reader) / f"s{shard:03d}of{num_shards:03d}"
    journal = read_json(folder / JOURNAL) or {
        "generation": reader.generation + 1, "shard": shard, "num_shards": num_shards,
        "layers": {}, "parts": [], "state": None}
    _clean_shard_dir(folder, journal)
    if job is not None and num_shards > 1:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / JOB_FILE, dict(job))
    found = journals(reader)
    versions = image_versions(reader, found, with_predictions=False)
    recs["row_id"] = _assign_row_ids(recs, versions, int(reader.manifest["next_row_id"]))
    code = label_code(recs["label"])
    have = pd.DataFrame({"row_id": versions["row_id"], "code": versions["code"]}).drop_duplicates()
    image_done = pd.MultiIndex.from_frame(pd.DataFrame({"row_id": recs["row_id"], "code": code})).isin(
        pd.MultiIndex.from_frame(have))
    need = ~image_done
    known = {l: i for _, j in found for l, i in j["layers"].items()}
    known.update(reader.manifest["layers"])
    writer = ShardWriter(reader, folder, shard, num_shards, journal, reader.committed_rows(), known)
    for layer in layers:
        writer.done[layer] = writer.done_rows(layer, found)
        need |= ~np.isin(recs["row_id"].to_numpy(), writer.done[layer])
    in_shard = shard_of(recs["image_id"].tolist(), num_shards) == shard
    todo = recs[need & in_shard].reset_index(drop=True)[["row_id", "image_id", "path", "label", "split"]]
    writer.planned = np.sort(todo["row_id"].to_numpy(np.int64))
    if journal.get("state"):
        with np.load(folder / journal["state"]) as z:
            for i, layer in enumerate(journal["state_layers"]):
                writer.tops[layer] = {s: tk.TopK.from_arrays(z, f"L{i}_{s}") for s in VALUE_STATS}
    return Plan(todo, shard, num_shards, layers, len(recs), int(in_shard.sum()), writer)


def _assign_row_ids(recs: pd.DataFrame, versions: pd.DataFrame, base: int) -> np.ndarray:
    """Known images keep their row ids; new ones (sorted) take the free ids from ``base`` up."""
    known = versions.drop_duplicates("image_id").set_index("image_id")["row_id"]
    ids = recs["image_id"].map(known)
    new = ids.isna().to_numpy()
    used = np.unique(versions["row_id"].to_numpy())
    used = used[used >= base]
    free = np.setdiff1d(np.arange(base, base + int(new.sum()) + len(used), dtype=np.int64), used)
    out = ids.to_numpy(dtype=np.float64, na_value=np.nan)
    result = np.empty(len(recs), np.int64)
    result[~new] = out[~new].astype(np.int64)
    result[new] = free[: int(new.sum())]
    return result


def shard_status(reader: StoreReader, records: pd.DataFrame) -> dict[str, Any]:
    """The sharded extraction waiting to be merged (see ``ActivationStore.shard_status``)."""
    work = work_dir(reader)
    found = [(p, SHARD_DIR.match(p.name)) for p in sorted(work.iterdir())] if work.is_dir() else []
    found = [(p, int(m.group(1)), int(m.group(2))) for p, m in found if m]
    if not found:
        return {"num_shards": None, "missing": {}, "jobs": {}}
    n = max(of for _, _, of in found)
    recs = normalize_records(records)
    versions = image_versions(reader, journals(reader), with_predictions=False)
    have = pd.MultiIndex.from_frame(versions[["image_id", "code"]])
    written = pd.MultiIndex.from_arrays([recs["image_id"], label_code(recs["label"])]).isin(have)
    shards = shard_of(recs.loc[~written, "image_id"].tolist(), n)
    missing = {int(k): int(v) for k, v in zip(*np.unique(shards, return_counts=True))}
    jobs = {s: read_json(p / JOB_FILE) for p, s, of in found if of == n and (p / JOB_FILE).is_file()}
    return {"num_shards": n, "missing": missing, "jobs": {s: j for s, j in jobs.items() if j}}


# ------------------------------------------------------------------------------------ writer ---

@dataclass
class ShardWriter:
    """In-memory state of one shard's writer between its plan and the next finalize."""

    reader: StoreReader
    folder: Path
    shard: int
    num_shards: int
    journal: dict[str, Any]
    committed_rows: np.ndarray
    known_layers: dict[str, dict[str, Any]]
    planned: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    done: dict[str, np.ndarray] = field(default_factory=dict)
    tops: dict[str, dict[str, tk.TopK]] = field(default_factory=dict)
    closed: str | None = None

    @property
    def generation(self) -> int:
        return self.reader.generation + 1

    def done_rows(self, layer: str, found: Journals) -> np.ndarray:
        """Rows that already hold ``layer``: committed (when the layer is) or in a journal."""
        rows = [part_layer_rows(folder, p, layer) for folder, j in found for p in j["parts"]
                if layer in p["layers"]]
        if layer in self.reader.manifest["layers"]:
            rows.append(self.committed_rows)
        return np.unique(np.concatenate(rows)) if rows else np.empty(0, np.int64)

    def write(self, chunk: pd.DataFrame, layers: Mapping[str, Mapping[str, Any]],
              predictions: Mapping[str, Any]) -> None:
        """Write one chunk of this shard; crash-safe at every step.

        ``layers``: {name: {"max": (N, C), "mean": (N, C), "argmax": (N, C) int (flat y*W+x),
        "hw": (H, W)}}; ``predictions``: {"prediction": (N,), "top5_ids": (N, m), "top5_scores":
        (N, m) softmax, "true_score": (N,) pre-softmax score of the label, NaN when unlabelled}.
        A layer's rows that are already stored are skipped.
        """
        committed = read_manifest(self.reader.root)
        if not self.closed and (committed or {}).get("generation") != self.reader.generation:
            self.closed = "another store object or process finalized the store since"
        if self.closed:
            raise PipelineError(f"this plan of shard {self.shard} can no longer write ({self.closed}): "
                                f"call store.plan(records, layers, shard={self.shard}, ...) again.")
        rows = chunk["row_id"].to_numpy(np.int64)
        n = len(rows)
        if n == 0:
            return
        at = np.searchsorted(self.planned, rows).clip(max=max(len(self.planned) - 1, 0))
        if len(self.planned) == 0 or not np.array_equal(self.planned[at], rows):
            raise PipelineError("plan.write got rows that are not in this shard's plan: "
                                "write the chunks that plan.chunks() yields.")
        order = np.argsort(rows, kind="stable")
        rows = rows[order]
        checked = {layer: self._check_layer_data(layer, data, n) for layer, data in layers.items()}
        images = _images_chunk(chunk.iloc[order], predictions, order, n)
        seq = self.journal["parts"][-1]["seq"] + 1 if self.journal["parts"] else 0
        entry: dict[str, Any] = {"seq": seq, "n": n, "images": f"images-{seq:05d}.parquet", "layers": {}}
        dtype = DTYPES[self.reader.dtype]
        k = self.reader.top_k
        tops = dict(self.tops)
        done = dict(self.done)
        shapes: dict[str, dict[str, Any]] = {}
        for layer, (maxv, meanv, argmax, hw) in checked.items():
            if layer not in done:
                done[layer] = self.done_rows(layer, journals(self.reader))
            keep = ~np.isin(rows, done[layer])
            if not keep.any():
                continue
            sel = order[keep]
            maxs, means, am = maxv[sel].astype(dtype), meanv[sel].astype(dtype), argmax[sel].astype(np.int32)
            name = part_name(self.generation, self.shard, self.num_shards, seq)
            write_parquet_atomic(part_table(rows[keep], maxs, means, am, dtype),
                                 self.folder / layer_dirname(layer) / name)
            running = dict(tops.get(layer, {}))
            for stat, block in (("max", maxs), ("mean", means)):
                prev = running.get(stat)
                floor = tk.floor_of(prev, k) if prev is not None else None
                new = tk.chunk_topk(block.astype(np.float32), rows[keep], am, k, floor)
                running[stat] = tk.merge([prev, new], k) if prev is not None else new
            tops[layer] = running
            shapes[layer] = {"channels": int(maxv.shape[1]), "hw": list(hw)}
            entry["layers"][layer] = {"file": f"{layer_dirname(layer)}/{name}", "n": int(keep.sum()),
                                      "rows": None if keep.all() else rows[keep].tolist()}
            done[layer] = np.union1d(done[layer], rows[keep])
        crash_point("part_written")
        write_parquet_atomic(images, self.folder / entry["images"])
        state = f"state-{seq:05d}.npz"
        state_layers = sorted(tops)
        arrays: dict[str, np.ndarray] = {}
        for i, layer in enumerate(state_layers):
            for stat in VALUE_STATS:
                arrays.update(tops[layer][stat].arrays(f"L{i}_{stat}"))
        tmp = tmp_path(self.folder / state)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, self.folder / state)
        journal = {**self.journal, "parts": [*self.journal["parts"], entry],
                   "layers": {**self.journal["layers"], **shapes}, "state": state, "state_layers": state_layers}
        atomic_write_json(self.folder / JOURNAL, journal)
        crash_point("journal_written")
        old_state = self.journal.get("state")
        self.journal, self.tops, self.done = journal, tops, done
        self.known_layers.update(shapes)
        if old_state and old_state != state:
            (self.folder / old_state).unlink(missing_ok=True)

    def _check_layer_data(self, layer: str, data: Mapping[str, Any],
                          n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
        """Validate one layer's arrays against each other and against what the store already holds."""
        if not isinstance(layer, str) or not layer:
            raise PipelineError(f"layer names must be non-empty strings, got {layer!r}.")
        try:
            maxv, meanv, argmax = (np.asarray(data[k]) for k in ("max", "mean", "argmax"))
            hw = tuple(int(v) for v in data["hw"])
        except KeyError as e:
            raise PipelineError(f"layer {layer!r}: plan.write needs 'max', 'mean', 'argmax' and 'hw' "
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
        known = self.known_layers.get(layer)
        if known and (known["channels"] != maxv.shape[1] or list(known["hw"]) != list(hw)):
            raise PipelineError(f"layer {layer!r} has {known['channels']} channels of {known['hw'][0]}x"
                                f"{known['hw'][1]} in the store but {maxv.shape[1]} of {hw[0]}x{hw[1]} were "
                                "given: the model changed; use a store for the new model key.")
        return maxv, meanv, argmax, hw


def _images_chunk(chunk: pd.DataFrame, predictions: Mapping[str, Any], order: np.ndarray, n: int) -> pa.Table:
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
