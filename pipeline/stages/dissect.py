"""stage=dissect: Network Dissection on the dataset's own concepts (boxes, masks, fragments, extra masks).

For each unit of the chosen layers: the threshold T_k (the unit's top ``quantile`` of activations over
every image and position), then IoU_k,c of the unit's upsampled map above T_k with every concept's
masks, summed over the dataset; plus class selectivity from labels alone (purity of the unit's top-k
images, and Morcos et al.'s selectivity index). Results go into the activation store's ``.meta``
(``pipeline.store.dissect``).

The model runs once per image (on the CPU in ``channels_last``, weights too: :class:`FastLayout`):
its layer maps (float16, layer resolution) are kept in a map cache keyed by image id, so a re-run
with more images forwards only the new ones, then recomputes the thresholds and IoUs from the cached
maps. A layer whose inputs (images, concepts, settings, store) did not change is not recomputed at
all. Cache parts are written by a second thread while the model runs on, and the concept masks are
built by a low-priority process from the start (:class:`ConceptSpool`).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pipeline.cache import make_key
from pipeline.data.loader import record_loader
from pipeline.dissect import concepts as cpt
from pipeline.dissect import iou as iou_m
from pipeline.dissect import selectivity as sel
from pipeline.dissect import threshold as thr
from pipeline.errors import PipelineError
from pipeline.methods.execution import FastLayout
from pipeline.methods.hooks import truncated_forward
from pipeline.runtime import Context, show
from pipeline.settings import plain
from pipeline.store.dissect import MapCache, dissection_key, read_dissect_summary, write_dissection

log = logging.getLogger(__name__)

VERSION = 1
PAIR_VALUES = 1 << 22  # layer-map values of (image, unit) pairs read at once
CONCEPT_COLUMNS = ["label", "box_x0", "box_y0", "box_x1", "box_y1", "mask", "fragment_boxes", "concepts"]


def lower_priority() -> None:
    """Make the calling thread yield to the others (Linux: a thread has its own nice value): cache
    writes and concept masks then run on the core the image loading leaves idle, instead of taking
    turns with the model's threads (which wait for each other). Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass


def dissect_layers(ctx: Context, store: Any) -> list[str]:
    """The configured layers (default: the extract stage's), each of which the store must hold."""
    dcfg = ctx.cfg.dissect
    spec = plain(dcfg.layers) if dcfg.layers else plain(ctx.cfg.extract.layers)
    layers = ctx.layers(spec)  # an unknown name: one line with close matches
    stored = store.layers()
    for layer in layers:
        if layer not in stored:
            raise PipelineError(f"layer {layer} is not in the activation store "
                                f"(it has: {', '.join(stored) or 'none'}): "
                                f"run `python -m pipeline stage=extract extract.layers=[{layer}]` first.")
    return layers


def image_records(ctx: Context) -> pd.DataFrame:
    """The dataset's records to dissect (``dissect.split``; null = all), one per image id, with
    model class indices (``model_label``) and the dataset's class names (``class_name``)."""
    data = ctx.dataset
    recs = data.records.copy()
    recs["model_label"] = ctx.model_labels()
    names = data.class_names
    recs["class_name"] = [None if pd.isna(v) else (names[int(v)] if names and 0 <= int(v) < len(names) else str(int(v)))
                          for v in recs["label"]]
    split = ctx.cfg.dissect.split
    if split is not None:
        recs = recs[recs["split"] == str(split)]
        if recs.empty:
            raise PipelineError(f"dissect.split={split}: no images in that split; splits: "
                                f"{', '.join(sorted(data.records['split'].unique()))}, or null for all.")
    return recs.drop_duplicates("image_id").reset_index(drop=True)


def class_concepts(ctx: Context, recs: pd.DataFrame) -> list[str]:
    """The class names that are concepts: those of labelled images with a box or an object mask
    (in the dataset's class order)."""
    located = recs["mask"].notna() | recs[["box_x0", "box_y0", "box_x1", "box_y1"]].notna().all(axis=1)
    present = set(recs.loc[located & recs["class_name"].notna(), "class_name"])
    order = ctx.dataset.class_names or sorted(present, key=lambda n: (len(n), n))
    return [n for n in order if n in present]


@torch.no_grad()
def fill_cache(ctx: Context, recs: pd.DataFrame, caches: dict[str, MapCache]) -> int:
    """Forward the images that any layer's map cache lacks (once, stopping after the deepest layer)
    and cache their maps; returns how many were forwarded."""
    have = {layer: set(c.index()) for layer, c in caches.items()}
    todo = recs[[any(i not in h for h in have.values()) for i in recs["image_id"]]]
    if todo.empty:
        return 0
    dcfg, model = ctx.cfg.dissect, ctx.model
    model.module.eval()
    layers = list(caches)
    fast = FastLayout(model.module, ctx.device, weights=True)
    part = int(dcfg.part_size)
    writing: Future | None = None
    with tqdm(total=len(todo), desc="dissect: forward", unit="img", disable=None if ctx.progress else True) as bar, \
            ThreadPoolExecutor(1, initializer=lower_priority) as writer:
        for start in range(0, len(todo), part):
            chunk = todo.iloc[start:start + part]
            out: dict[str, list[np.ndarray]] = {}  # per layer: maps, maxima, means, block maxima of the part
            pos = 0
            for x, _ in record_loader(chunk, model.transform, int(dcfg.batch_size), int(dcfg.num_workers)):
                maps = fast.apply(lambda module, b: truncated_forward(module, b, layers), x.to(ctx.device))
                for layer in layers:
                    m = maps[layer]
                    if m.dim() != 4:
                        raise PipelineError(f"layer {layer} outputs shape {tuple(m.shape)}, not a (B,C,H,W) map: "
                                            "dissect convolutional layers (dissect.layers=[...]).")
                    m = m.detach().float()
                    blocks = thr.block_maxima(m)
                    values = (m, blocks.amax(2), m.mean((2, 3)), blocks)
                    if layer not in out:
                        out[layer] = [np.empty((len(chunk), *v.shape[1:]), dtype) for v, dtype in
                                      zip(values, (np.float16, np.float16, np.float32, np.float16))]
                    for dst, v in zip(out[layer], values):  # converted straight into the part's arrays
                        torch.from_numpy(dst[pos:pos + len(x)]).copy_(v)
                pos += len(x)
                bar.update(len(x))
            if writing is not None:
                writing.result()  # one part in memory while the next is computed
            writing = writer.submit(write_parts, caches, chunk["image_id"].tolist(), out)
        if writing is not None:
            writing.result()
    return len(todo)


def write_parts(caches: dict[str, MapCache], ids: list[str], out: dict[str, list[np.ndarray]]) -> None:
    """Write one part per layer: maps, maxima, means and block maxima of ``ids``."""
    for layer, arrays in out.items():
        caches[layer].write(ids, *arrays)


def pair_maps(cache: MapCache, chunk: list[str], pairs: np.ndarray,
              hw: tuple[int, int]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(images, units, float16 (n,h,w) maps) of the (image, unit) pairs where ``pairs`` (n,C) is True,
    at most PAIR_VALUES map values at a time (so memory does not follow the layer's size)."""
    at = np.flatnonzero(pairs)
    images, units = at // pairs.shape[1], at % pairs.shape[1]
    step = max(1, PAIR_VALUES // (hw[0] * hw[1]))
    for lo in range(0, len(images), step):
        im, un = images[lo:lo + step], units[lo:lo + step]
        yield im, un, cache.maps(chunk, im, un)


def layer_thresholds(cache: MapCache, ids: list[str], hw: tuple[int, int], q: float, batch: int) -> np.ndarray:
    """T_k of every unit over the cached maps of ``ids``: a floor from the block maxima, the high-byte
    counts of the values above it, then the fine counts inside the bin that holds T_k."""
    m = thr.quantile_count(q, len(ids) * hw[0] * hw[1])
    chunks = [ids[s:s + batch] for s in range(0, len(ids), batch)]
    floor = thr.floor_bins(sum(thr.coarse_counts(cache.blocks(chunk)) for chunk in chunks), m)
    coarse = np.zeros((len(floor), thr.BINS), np.int64)
    for chunk in chunks:
        for _, units, maps in pair_maps(cache, chunk, thr.candidates(cache.stats(chunk)[0], floor), hw):
            coarse += thr.high_counts(maps, units, floor)
    bins, higher = thr.pick_bins(coarse, m)
    fine = np.zeros_like(coarse)
    for chunk in chunks:
        for _, units, maps in pair_maps(cache, chunk, thr.candidates(cache.stats(chunk)[0], bins), hw):
            fine += thr.fine_counts(maps, units, bins)
    return thr.thresholds(fine, bins, higher, m)


def concept_index(ctx: Context, recs: pd.DataFrame) -> dict[str, int]:
    """Every concept of the dataset -> its column in the IoU tables (a warning when there is none)."""
    names = cpt.concept_names(class_concepts(ctx, recs), recs.to_dict("records"))
    if not names:
        log.warning("dissect: the dataset has no boxes, object masks or concept masks, so no unit can be "
                    "labelled with a concept; only the class selectivity is computed (a manifest can add "
                    "box_x0..box_y1, mask or concepts columns)")
    return {n: i for i, n in enumerate(names)}


class ConceptBuilder:
    """Builds the concept codes of one batch of records and spills them to a scratch file."""

    def __init__(self, rows: list[dict[str, Any]], index: dict[str, int], size: tuple[int, int], transform: Any,
                 input_hw: tuple[int, int], batch: int, scratch: str) -> None:
        self.rows, self.index, self.size, self.transform = rows, index, size, transform
        self.input_hw, self.batch, self.scratch = input_hw, batch, scratch

    def __call__(self, start: int) -> tuple[str, list[str]]:
        """The scratch file of the batch at ``start``, and the problems met (masks skipped)."""
        per_image, skipped = [], []
        for rec in self.rows[start:start + self.batch]:
            items, problems = cpt.image_concepts(rec, rec["class_name"], cpt.image_size(rec["path"]), self.transform,
                                                 self.input_hw, self.size)
            skipped.extend(problems)
            per_image.append(items)
        bits, ids = cpt.stack_slots(per_image, self.index, self.size)
        path = str(Path(self.scratch) / f"{start}.npz")
        np.savez(path, bits=bits, ids=ids)
        return path, skipped


_BUILDER: list[ConceptBuilder] = []  # in a spool's worker process: its builder


def _start_builder(builder: ConceptBuilder) -> None:
    lower_priority()
    _BUILDER.append(builder)


def _build(start: int) -> tuple[str, list[str]]:
    return _BUILDER[0](start)


class ConceptSpool:
    """The concept masks of every batch of ``recs`` at ``size``, built in order from the moment the
    spool is made, by a low-priority forked process where there is ``fork`` (Linux; elsewhere a
    thread): it then runs on the core the forward pass's image loading leaves idle, where a thread
    would take the interpreter lock from the loading. Each batch is spilled to a scratch file until
    it is read, so memory does not grow with the dataset. Problems (a mask missing or of another
    size) go to ``skipped``."""

    def __init__(self, ctx: Context, recs: pd.DataFrame, index: dict[str, int], size: tuple[int, int],
                 batch: int) -> None:
        self.skipped: list[str] = []
        self.index = index  # concept -> its column
        self._scratch = tempfile.TemporaryDirectory(prefix="dissect-concepts-")
        builder = ConceptBuilder(recs.to_dict("records"), index, size, ctx.model.transform,
                                 tuple(ctx.model.input_shape[-2:]), batch, self._scratch.name)
        starts = range(0, len(recs), batch)
        self._pool: Executor
        if sys.platform.startswith("linux"):  # fork: the builder is inherited, nothing is pickled
            self._pool = ProcessPoolExecutor(1, mp_context=mp.get_context("fork"), initializer=_start_builder,
                                             initargs=(builder,))
            self._batches = [self._pool.submit(_build, start) for start in starts]
        else:
            self._pool = ThreadPoolExecutor(1, initializer=lower_priority)
            self._batches = [self._pool.submit(builder, start) for start in starts]

    def __iter__(self) -> Iterator[iou_m.Codes]:
        """The batches' concept codes, in order."""
        for batch in self._batches:
            path, problems = batch.result()
            self.skipped.extend(problems)
            with np.load(path) as f:
                bits, ids = f["bits"], f["ids"]
            Path(path).unlink()
            yield iou_m.slot_codes(torch.from_numpy(bits.astype(np.int64)), torch.from_numpy(ids), len(self.index))

    def close(self) -> None:
        """Stop building and remove the scratch files."""
        self._pool.shutdown(cancel_futures=True)
        self._scratch.cleanup()


def unit_selectivity(store: Any, layer: str, means: np.ndarray, k: int, class_names: list[str]) -> pd.DataFrame:
    """Per unit: purity of its top-k images' labels (by spatial max), top class, selectivity index."""
    rows = []
    k = min(k, store.top_k)
    index = sel.selectivity_index(means)
    images = store.images()
    label_of = {i: None if pd.isna(v) else int(v) for i, v in zip(images["image_id"], images["label"])}
    for unit, top_ids in enumerate(store.top_images(layer, k)["top"]):  # every unit at once: no table each
        purity, top = sel.purity([label_of[i] for i in top_ids])
        rows.append({"unit": unit, "purity": purity, "selectivity": float(index[unit]),
                     "top_class": None if top is None else class_names[top]})
    return pd.DataFrame(rows)


def result_key(ctx: Context, store: Any, layer: str, recs: pd.DataFrame, size: tuple[int, int]) -> str:
    """What a layer's dissection depends on: model, layer, images and their concepts, settings, store."""
    dcfg = ctx.cfg.dissect
    concepts = pd.util.hash_pandas_object(recs[["image_id", *CONCEPT_COLUMNS]].astype(str), index=False)
    return make_key(kind="dissect", version=VERSION, model=ctx.model.key, layer=layer,
                    images=make_key(ids=recs["image_id"].tolist(), concepts=concepts.to_numpy().tolist()),
                    quantile=float(dcfg.quantile), size=list(size), cut=float(dcfg.cut), topk=int(dcfg.top_k),
                    store=store.generation)


def dissect_layers_now(ctx: Context, store: Any, layers: list[str], recs: pd.DataFrame, caches: dict[str, MapCache],
                       size: tuple[int, int], keys: dict[str, str], spool: ConceptSpool,
                       timings: dict[str, float]) -> tuple[dict[str, dict[str, Any]], int]:
    """Thresholds, IoUs (against the ``spool``'s concepts) and selectivity of ``layers``; written to
    the store. Returns the summaries and the number of concept masks skipped; the passes' seconds
    go into ``timings``."""
    dcfg, model = ctx.cfg.dissect, ctx.model
    ids = recs["image_id"].tolist()
    batch = int(dcfg.part_size)  # images per step of the threshold and IoU passes (and of the spool)
    names = list(spool.index)
    clock = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:  # numpy lets go of the interpreter in its loops: two layers at once
        futures = {layer: pool.submit(layer_thresholds, caches[layer], ids, store.hw(layer), float(dcfg.quantile),
                                      batch) for layer in layers}
        t = {layer: f.result() for layer, f in futures.items()}
    timings["thresholds"] = time.perf_counter() - clock
    clock = time.perf_counter()
    overlaps = {layer: iou_m.Overlaps(store.channels(layer), len(names)) for layer in layers}
    n_classes = len(model.class_names)
    sums = {layer: np.zeros((n_classes, store.channels(layer))) for layer in layers}
    counts = np.zeros(n_classes)
    labels = recs["model_label"].to_numpy()
    axes = {layer: tuple(iou_m.axis_groups(iou_m.upsample_weights(n, n_out))
                         for n, n_out in zip(store.hw(layer), size)) for layer in layers}
    with tqdm(total=len(ids), desc="dissect: IoU", unit="img", disable=None if ctx.progress else True) as bar:
        for b, codes in enumerate(spool):
            chunk = ids[b * batch:(b + 1) * batch]
            lab = labels[b * batch:(b + 1) * batch]
            ok = lab >= 0
            np.add.at(counts, lab[ok], 1)
            for layer in layers:
                maxima, means = caches[layer].stats(chunk)
                np.add.at(sums[layer], lab[ok], means[ok])
                overlaps[layer].add_concepts(codes)
                # a bilinear value never exceeds its neighbours' maximum: a map whose maximum is not
                # above the threshold fires nowhere, and is not even read
                fires = maxima.astype(np.float32) > t[layer][None, :]
                blocks = caches[layer].blocks(chunk)
                for im, un, maps in pair_maps(caches[layer], chunk, fires, store.hw(layer)):
                    overlaps[layer].add_units(torch.from_numpy(maps), torch.from_numpy(blocks[im, un]),
                                              torch.from_numpy(t[layer][un]), torch.from_numpy(im),
                                              torch.from_numpy(un), *axes[layer], codes)
            bar.update(len(lab))
    timings["iou"] = time.perf_counter() - clock
    skipped = spool.skipped
    if skipped:
        log.warning("dissect: %d concept masks skipped (missing or of another size), e.g. %s", len(skipped), skipped[0])
    summaries = {}
    cut = float(dcfg.cut)
    for layer in layers:
        iou = overlaps[layer].iou()
        best = iou_m.best_concepts(iou, names, cut)
        means = sel.class_means(sums[layer], counts)
        units = best.merge(unit_selectivity(store, layer, means, int(dcfg.top_k), model.class_names), on="unit")
        labelled = int(units["label"].notna().sum())
        summary = {"layer": layer, "units": int(iou.shape[0]), "labelled": labelled,
                   "unique_detectors": iou_m.unique_detectors(units["label"].tolist()), "cut": cut,
                   "quantile": float(dcfg.quantile), "images": len(ids)}
        write_dissection(store, layer, iou_m.iou_table(layer, iou, names), units, summary, keys[layer])
        summaries[layer] = summary
    return summaries, len(skipped)


def run(ctx: Context) -> dict[str, Any]:
    """Dissect the configured layers over the dataset; print the per-layer summary."""
    store = ctx.store()
    layers = dissect_layers(ctx, store)
    recs = image_records(ctx)
    size = cpt.iou_size(tuple(ctx.model.input_shape[-2:]), ctx.cfg.dissect.resolution)
    keys = {layer: result_key(ctx, store, layer, recs, size) for layer in layers}
    todo = [layer for layer in layers if dissection_key(store, layer) != keys[layer]]
    start = time.perf_counter()
    forwarded, skipped, summaries = 0, 0, {}
    timings: dict[str, float] = {}
    if todo:
        caches = {layer: MapCache(ctx.cache.root, ctx.model.key, layer) for layer in todo}
        spool = ConceptSpool(ctx, recs, concept_index(ctx, recs), size, int(ctx.cfg.dissect.part_size))
        try:
            clock = time.perf_counter()
            forwarded = fill_cache(ctx, recs, caches)
            timings["forward"] = time.perf_counter() - clock
            summaries, skipped = dissect_layers_now(ctx, store, todo, recs, caches, size, keys, spool, timings)
        finally:
            spool.close()
    summaries = {layer: summaries.get(layer) or read_dissect_summary(store, layer) for layer in layers}
    table = pd.DataFrame([summaries[layer] for layer in layers])[["layer", "units", "labelled", "unique_detectors"]]
    show(f"\ndissection of {len(recs)} images (IoU > {float(ctx.cfg.dissect.cut)} labels a unit):\n"
         f"{table.to_string(index=False)}")
    seconds = time.perf_counter() - start
    return {"layers": summaries, "images": len(recs), "forwarded": forwarded, "recomputed": todo,
            "skipped_masks": skipped, "iou_size": list(size), "store": str(store.root),
            "images_per_s": round(len(recs) / seconds, 1) if todo and seconds > 0 else None,
            "seconds_by_pass": {k: round(v, 3) for k, v in timings.items()}}


def check(cfg: Any) -> None:
    """dissect.resolution must be a positive side length or null."""
    res = cfg.dissect.resolution
    if res is not None and (isinstance(res, bool) or not isinstance(res, int) or res < 1):
        raise PipelineError(f"dissect.resolution={res}: give a side length in pixels (e.g. 112) or null for the "
                            "input's size.")
