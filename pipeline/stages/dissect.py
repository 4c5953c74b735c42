"""stage=dissect: Network Dissection on the dataset's own concepts (boxes, masks, fragments, extra masks).

For each unit of the chosen layers: the threshold T_k (the unit's top ``quantile`` of activations over
every image and position), then IoU_k,c of the unit's upsampled map above T_k with every concept's
masks, summed over the dataset; plus class selectivity from labels alone (purity of the unit's top-k
images, and Morcos et al.'s selectivity index). Results go into the activation store's ``.meta``
(``pipeline.store.dissect``).

The model runs once per image: its layer maps (float16, layer resolution) are kept in a map cache
keyed by image id, so a re-run with more images forwards only the new ones, then recomputes the
thresholds and IoUs from the cached maps. A layer whose inputs (images, concepts, settings, store)
did not change is not recomputed at all.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from pipeline.cache import make_key
from pipeline.data.loader import record_loader
from pipeline.dissect import concepts as cpt
from pipeline.dissect import iou as iou_m
from pipeline.dissect import selectivity as sel
from pipeline.dissect import threshold as thr
from pipeline.errors import PipelineError
from pipeline.methods.hooks import truncated_forward
from pipeline.runtime import Context, show
from pipeline.settings import plain
from pipeline.store.dissect import MapCache, dissection_key, read_dissect_summary, write_dissection

log = logging.getLogger(__name__)

VERSION = 1
PAIR_PIXELS = 1 << 23  # upsampled pixels of (image, unit) pairs handled at once
CONCEPT_COLUMNS = ["label", "box_x0", "box_y0", "box_x1", "box_y1", "mask", "fragment_boxes", "concepts"]


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
    part = int(dcfg.part_size)
    with tqdm(total=len(todo), desc="dissect: forward", unit="img", disable=None if ctx.progress else True) as bar:
        for start in range(0, len(todo), part):
            chunk = todo.iloc[start:start + part]
            out: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
            stats: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {layer: [] for layer in layers}
            coarse: dict[str, np.ndarray] = {}
            for x, _ in record_loader(chunk, model.transform, int(dcfg.batch_size), int(dcfg.num_workers)):
                maps = truncated_forward(model.module, x.to(ctx.device), layers)
                for layer in layers:
                    m = maps[layer]
                    if m.dim() != 4:
                        raise PipelineError(f"layer {layer} outputs shape {tuple(m.shape)}, not a (B,C,H,W) map: "
                                            "dissect convolutional layers (dissect.layers=[...]).")
                    flat = m.detach().flatten(2).float()
                    stats[layer].append((flat.amax(2).cpu().numpy(), flat.mean(2).cpu().numpy()))
                    half = m.detach().to(torch.float16).cpu().numpy()
                    counts = thr.coarse_counts(half)
                    coarse[layer] = coarse[layer] + counts if layer in coarse else counts
                    out[layer].append(half)
                bar.update(len(x))
            ids = chunk["image_id"].tolist()
            for layer in layers:
                maxima, means = (np.concatenate(a) for a in zip(*stats[layer]))
                caches[layer].write(ids, np.concatenate(out[layer]), maxima, means, coarse[layer])
    return len(todo)


def layer_thresholds(cache: MapCache, ids: list[str], hw: tuple[int, int], q: float, batch: int) -> np.ndarray:
    """T_k of every unit over the cached maps of ``ids``: the parts' stored coarse counts (counted
    from maps only for parts partly in ``ids``), then the fine counts from the candidate maps."""
    coarse, rest = cache.coarse(ids)
    for pos in rest:
        counts = thr.coarse_counts(cache.maps(ids, pos))
        coarse = counts if coarse is None else coarse + counts
    m = thr.quantile_count(q, len(ids) * hw[0] * hw[1])
    bins, higher = thr.pick_bins(coarse, m)
    fine = np.zeros_like(coarse)
    for start in range(0, len(ids), batch):
        chunk = ids[start:start + batch]
        images, units = np.nonzero(thr.candidates(cache.stats(chunk)[0], bins))
        if len(images):
            fine += thr.fine_counts(cache.maps(chunk, images, units), units, bins)
    return thr.thresholds(fine, bins, higher, m)


def concept_batches(ctx: Context, recs: pd.DataFrame, index: dict[str, int], size: tuple[int, int],
                    batch: int, skipped: list[str]) -> Any:
    """(slots, ids) concept masks at ``size`` for each batch of ``recs``; problems go to ``skipped``."""
    model = ctx.model
    input_hw = tuple(model.input_shape[-2:])
    rows = recs.to_dict("records")
    for start in range(0, len(rows), batch):
        per_image = []
        for rec in rows[start:start + batch]:
            with Image.open(rec["path"]) as im:
                image_size = im.size
            items, problems = cpt.image_concepts(rec, rec["class_name"], image_size, model.transform, input_hw, size)
            skipped.extend(problems)
            per_image.append(items)
        yield cpt.stack_slots(per_image, index, size)


def unit_selectivity(store: Any, layer: str, means: np.ndarray, k: int, class_names: list[str]) -> pd.DataFrame:
    """Per unit: purity of its top-k images' labels (by spatial max), top class, selectivity index."""
    rows = []
    k = min(k, store.top_k)
    index = sel.selectivity_index(means)
    for unit in range(store.channels(layer)):
        labels = [None if pd.isna(v) else int(v) for v in store.topk(layer, unit, k)["label"]]
        purity, top = sel.purity(labels)
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
                       size: tuple[int, int], keys: dict[str, str],
                       timings: dict[str, float]) -> tuple[dict[str, dict[str, Any]], int]:
    """Thresholds, IoUs and selectivity of ``layers``; written to the store. Returns the summaries
    and the number of concept masks skipped; the passes' seconds go into ``timings``."""
    dcfg, model = ctx.cfg.dissect, ctx.model
    ids = recs["image_id"].tolist()
    batch = int(dcfg.batch_size)
    names = cpt.concept_names(class_concepts(ctx, recs), recs.to_dict("records"))
    if not names:
        log.warning("dissect: the dataset has no boxes, object masks or concept masks, so no unit can be "
                    "labelled with a concept; only the class selectivity is computed (a manifest can add "
                    "box_x0..box_y1, mask or concepts columns)")
    index = {n: i for i, n in enumerate(names)}
    clock = time.perf_counter()
    t = {layer: layer_thresholds(caches[layer], ids, store.hw(layer), float(dcfg.quantile), batch) for layer in layers}
    timings["thresholds"] = time.perf_counter() - clock
    clock = time.perf_counter()
    overlaps = {layer: iou_m.Overlaps(store.channels(layer), len(names)) for layer in layers}
    n_classes = len(model.class_names)
    sums = {layer: np.zeros((n_classes, store.channels(layer))) for layer in layers}
    counts = np.zeros(n_classes)
    labels = recs["model_label"].to_numpy()
    weights = {layer: (iou_m.upsample_weights(store.hw(layer)[0], size[0]),
                       iou_m.upsample_weights(store.hw(layer)[1], size[1])) for layer in layers}
    skipped: list[str] = []
    with tqdm(total=len(ids), desc="dissect: IoU", unit="img", disable=None if ctx.progress else True) as bar:
        for b, (slots, slot_ids) in enumerate(concept_batches(ctx, recs, index, size, batch, skipped)):
            chunk = ids[b * batch:(b + 1) * batch]
            lab = labels[b * batch:(b + 1) * batch]
            ok = lab >= 0
            np.add.at(counts, lab[ok], 1)
            for layer in layers:
                maxima, means = caches[layer].stats(chunk)
                np.add.at(sums[layer], lab[ok], means[ok])
                overlaps[layer].add_concepts(slots, slot_ids)
                # a bilinear value never exceeds its neighbours' maximum: a map whose maximum is not
                # above the threshold fires nowhere, and is not even read
                images, units = np.nonzero(maxima.astype(np.float32) > t[layer][None, :])
                if not len(images):
                    continue
                step = max(1, PAIR_PIXELS // (size[0] * size[1]))  # bounds the memory of the fired maps
                for lo in range(0, len(images), step):
                    im, un = images[lo:lo + step], units[lo:lo + step]
                    maps = torch.from_numpy(caches[layer].maps(chunk, im, un))
                    fired = iou_m.fire(maps, torch.from_numpy(t[layer][un]), *weights[layer])
                    overlaps[layer].add_units(fired, torch.from_numpy(im), torch.from_numpy(un), slots, slot_ids)
            bar.update(len(lab))
    timings["iou"] = time.perf_counter() - clock
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
        clock = time.perf_counter()
        forwarded = fill_cache(ctx, recs, caches)
        timings["forward"] = time.perf_counter() - clock
        summaries, skipped = dissect_layers_now(ctx, store, todo, recs, caches, size, keys, timings)
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
