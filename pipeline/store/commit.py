"""Committing the next generation: merging shard journals and top-Ks, and rolling a commit forward.

``Commit.run`` builds the next generation from the committed store and every shard journal: it
drops removed images, compacts the parts that held them, merges top-Ks (recomputing from the data
only the channels whose list lost a row), stages everything under ``.work/commit/`` and writes
``.work/commit.json`` (the commit point). Applying it (:func:`apply_pending_commit`: moves,
deletes, manifests, store manifest last) is idempotent and is redone by the next open if the
process dies half way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.cache import atomic_write_json, make_key, read_manifest
from pipeline.errors import PipelineError
from pipeline.store import topk as tk
from pipeline.store.layout import (EXTRACT_HINT, IMAGES, META, STORE_MANIFEST, VALUE_STATS, WORK, compacted_name,
                                   crash_point, layer_dirname, meta_dir, write_parquet_atomic)
from pipeline.store.reader import TOPK_FILE, StoreReader
from pipeline.store.records import label_code, normalize_records
from pipeline.store.writer import image_versions, journals as shard_journals, part_layer_rows, read_json


class Commit:
    """One finalize of a store: reads through ``reader`` (the committed generation); after
    :meth:`run`, ``manifest`` is the store manifest now committed."""

    def __init__(self, reader: StoreReader) -> None:
        self.reader = reader
        self.root = reader.root
        self.manifest = reader.manifest

    def run(self, records: pd.DataFrame) -> dict[str, Any]:
        """Commit the next generation (see the module docstring); a no-op when nothing changed.

        Returns counts: generation, changed, n_images, added, removed, and per layer the rows,
        parts, compacted parts and channels whose top-K was recomputed.
        """
        t0 = time.perf_counter()
        recs = normalize_records(records)
        work = self.root / WORK
        shutil.rmtree(work / "commit", ignore_errors=True)
        journals = shard_journals(self.reader)
        versions = image_versions(self.reader, journals, with_predictions=True)
        images, stats = self._final_images(recs, versions)
        committed = self.reader.committed_images()
        if not journals and _same_metadata(images, committed):
            return {"generation": self.reader.generation, "changed": False, "n_images": len(images),
                    "added": 0, "removed": 0, "seconds": round(time.perf_counter() - t0, 3), "layers": {}}
        gen = self.reader.generation + 1
        stage = work / "commit"
        live = images.column("row_id").to_numpy()
        moves: list[tuple[Path, Path]] = []
        deletes: list[Path] = []
        layer_info: dict[str, Any] = {}
        stats["layers"] = {}
        names = sorted(set(self.reader.manifest["layers"]) | {l for _, j in journals for l in j["layers"]})
        for layer in names:
            info, lmoves, ldeletes, lstats = self._finalize_layer(layer, gen, live, journals, stage)
            layer_info[layer] = info
            moves += lmoves
            deletes += ldeletes
            stats["layers"][layer] = lstats
        write_parquet_atomic(images, stage / IMAGES, row_group_size=8192)
        moves.append((stage / IMAGES, self.root / IMAGES))
        next_row = max(int(self.reader.manifest["next_row_id"]),
                       int(pc.max(versions.column("row_id")).as_py() or 0) + 1 if versions.num_rows else 0)
        manifest = {**self.reader.manifest, "generation": gen, "n_images": int(len(live)),
                    "next_row_id": next_row, "layers": layer_info,
                    "committed": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        def rel(p: Path) -> str:
            return p.relative_to(self.root).as_posix()

        commit_log = {"generation": gen, "moves": [[rel(a), rel(b)] for a, b in moves],
                  "deletes": [rel(p) for p in deletes], "manifest": manifest,
                  "layer_dirs": [layer_dirname(l) for l in layer_info]}
        crash_point("finalize_staged")
        atomic_write_json(work / "commit.json", commit_log)
        crash_point("finalize_committed")
        apply_pending_commit(self.root)
        self.manifest = manifest
        stats.update({"generation": gen, "changed": True, "n_images": int(len(live)),
                      "seconds": round(time.perf_counter() - t0, 3)})
        return stats

    def _final_images(self, recs: pd.DataFrame, versions: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
        """The next images table: for each record the newest stored version with the same label."""
        vdf = pd.DataFrame({"image_id": versions.column("image_id").to_numpy(zero_copy_only=False),
                            "code": label_code(versions.column("label").to_pandas()),
                            "idx": np.arange(versions.num_rows)})
        want = pd.DataFrame({"image_id": recs["image_id"].to_numpy(), "code": label_code(recs["label"]),
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
        committed = self.reader.committed_rows()
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
        committed_meta = self.reader.layer_manifest(layer) if layer in self.reader.manifest["layers"] else None
        # Every (row, layer) has one source: the last journal part that wrote it, else the committed parts.
        jparts = [(folder, p) for folder, j in journals for p in j["parts"] if layer in p["layers"]]
        jrows = [part_layer_rows(folder, p, layer) for folder, p in jparts]
        if jrows:
            allr = np.concatenate(jrows)
            pidx = np.concatenate([np.full(len(r), i) for i, r in enumerate(jrows)])
            journal_rows, first = np.unique(allr[::-1], return_index=True)
            owner = pidx[len(allr) - 1 - first]
        else:
            journal_rows, owner = np.empty(0, np.int64), np.empty(0, np.int64)
        committed_rows = self.reader.committed_rows() if committed_meta else np.empty(0, np.int64)
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
                top, lost = tk.drop_rows(self.reader.tops(layer)[stat], dropped_committed, self.reader.top_k)
                sources.append(top)
                unsafe |= lost
            for folder, j in journals:
                if layer not in j.get("state_layers", []):
                    continue
                with np.load(folder / j["state"]) as z:
                    top = tk.TopK.from_arrays(z, f"L{j['state_layers'].index(layer)}_{stat}")
                drops = np.sort(np.concatenate(dropped_by_dir.get(folder, [np.empty(0, np.int64)])))
                top, lost = tk.drop_rows(top, drops, self.reader.top_k)
                sources.append(top)
                unsafe |= lost
            nonempty = [s for s in sources if s.values.shape[1]]
            merged[stat] = tk.merge(nonempty, self.reader.top_k) if nonempty else tk.TopK.empty(channels)
        recomputed = np.flatnonzero(unsafe)
        if len(recomputed):
            merged = self._recompute_tops(merged, recomputed, read_paths)
        merged = {s: tk.trim(t) for s, t in merged.items()}
        n_rows = int(sum(p["n"] for p in final_parts))
        info = {"dir": ldir, "channels": channels, "hw": list(hw), "dtype": self.reader.dtype, "n_rows": n_rows,
                "state": make_key(layer=layer, parts=[[p["file"], p["n"]] for p in final_parts])}
        meta_stage = stage / META / ldir
        meta_stage.mkdir(parents=True, exist_ok=True)
        arrays = {**merged["max"].arrays("max"), **merged["mean"].arrays("mean")}
        with open(meta_stage / TOPK_FILE, "wb") as f:
            np.savez(f, **arrays)
        atomic_write_json(meta_stage / "manifest.json", {"layer": layer, **info, "top_k": self.reader.top_k,
                                                         "generation": gen, "parts": final_parts})
        meta_dest = meta_dir(self.root, layer)
        moves += [(meta_stage / TOPK_FILE, meta_dest / TOPK_FILE),
                  (meta_stage / "manifest.json", meta_dest / "manifest.json")]
        stats = {"n_rows": n_rows, "parts": len(final_parts), "compacted_parts": compacted,
                 "topk_recomputed_channels": int(len(recomputed))}
        return info, moves, deletes, stats

    def _layer_shape(self, layer: str,
                     journals: list[tuple[Path, dict[str, Any]]]) -> tuple[int, tuple[int, int]]:
        info = self.reader.manifest["layers"].get(layer)
        for _, j in journals:
            info = info or j["layers"].get(layer)
        return int(info["channels"]), (int(info["hw"][0]), int(info["hw"][1]))

    def _recompute_tops(self, merged: dict[str, tk.TopK], channels: np.ndarray,
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
                fresh[stat].append(tk.chunk_topk(block, t.column("row_id").to_numpy(), am, self.reader.top_k))
        out = {}
        for stat in VALUE_STATS:
            cur = merged[stat]
            parts = [f for f in fresh[stat] if f.values.shape[1]]
            new = tk.merge(parts, self.reader.top_k) if parts else tk.TopK.empty(len(channels))
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


def _part_entry(name: str, rows: np.ndarray) -> dict[str, Any]:
    return {"file": name, "n": int(len(rows)), "min_row": int(rows.min()), "max_row": int(rows.max())}


def _same_metadata(new: pa.Table, old: pa.Table) -> bool:
    """Whether two images tables hold the same rows and metadata (predictions are not compared)."""
    cols = ["row_id", "image_id", "path", "label", "split"]
    return new.num_rows == old.num_rows and new.select(cols).equals(old.select(cols))


def apply_pending_commit(root: Path) -> None:
    """Roll a committed finalize forward: moves, deletes, store manifest, then drop the work folder.

    Every step is idempotent, so a finalize killed half way through is completed by the next open.
    """
    work = root / WORK
    commit = read_json(work / "commit.json")
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
