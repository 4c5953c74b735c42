"""Configured methods, and explanations with their scores for every image of a split.

:func:`build_methods` makes the methods of ``explain.methods`` from the registry with their config
blocks. :class:`SplitExplainer` runs them over thousands of images: batched through each method's
call, scored as they are made (share of positive attribution inside the object, pointing hit, box
IoU; deletion and insertion AUC for a few images per class), and written to the map store
(:mod:`pipeline.store.maps`) a part at a time, so memory stays bounded and a re-run computes only
the images (or boxes, masks, targets) it has not seen. Shared by stage=explain
(``explain.select.all``) and stage=audit (its reliance section).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from pipeline.data.images import load_image
from pipeline.errors import PipelineError, suggest
from pipeline.localizers import StageLocalizers
from pipeline.methods.base import MapMethod, SharedPass, shared_pass
from pipeline.methods.cam import cam_box
from pipeline.methods.execution import pass_size
from pipeline.methods.metrics import box_iou, box_masks, deletion, inside_energy, insertion, pointing_mask
from pipeline.methods.registry import METHODS, make_method
from pipeline.runtime import Context
from pipeline.settings import plain
from pipeline.reliance.summary import Rules
from pipeline.selection import Item, Predictions, input_box, input_mask, resolve_target, select_images
from pipeline.store import shard_of
from pipeline.store.maps import (MapStore, encode_maps, encode_objects, map_store_key, row_key, shrink,
                                 thumbs)

log = logging.getLogger(__name__)

PART_ROWS = 512  # rows buffered per method before a part is written (what a killed run can lose)
SCORES = ("inside_energy", "pointing_hit", "box_iou", "deletion_auc", "insertion_auc")
Passes = tuple[list[SharedPass], list[int]]  # a chunk's shared passes, and the chunk positions they cover


def method_names(ecfg: DictConfig) -> list[str]:
    """``explain.methods``, checked against the registry, duplicates dropped."""
    names = [str(m) for m in ecfg.methods]
    for m in names:
        if m not in METHODS:
            raise PipelineError(f"unknown explain method '{m}'.{suggest(m, METHODS)} Methods: {', '.join(METHODS)}.")
    if not names:
        raise PipelineError(f"explain.methods is empty: list some of {', '.join(METHODS)}.")
    return list(dict.fromkeys(names))


def build_methods(ctx: Context, ecfg: DictConfig, names: list[str], x0: torch.Tensor) -> dict[str, MapMethod]:
    """Each named method from the registry with its ``explain.<name>`` block, prepared on ``x0``."""
    env = StageLocalizers(ctx, int(ecfg.batch_size))
    return {name: make_method(name, plain(ecfg.get(name))).prepare(ctx.model.module, x0, env) for name in names}


def images_per_call(spec: Any, x0: torch.Tensor) -> int:
    """Images per batched method call (what is held in memory at once): a number, or ``auto``: 16
    images of 224x224 on the CPU (32 on a GPU), more of smaller ones (up to 256). Methods split a
    call into passes of their own size (:func:`~pipeline.methods.execution.pass_size`)."""
    if str(spec) == "auto":
        per = 32 if x0.device.type != "cpu" else 16
        return int(min(256, max(per, per * (224 * 224) // (x0.shape[-1] * x0.shape[-2]))))
    if not str(spec).isdigit() or int(spec) < 1:
        raise PipelineError(f"explain.images_per_call={spec} is not valid: use auto or a whole number >= 1.")
    return int(spec)


def object_digest(item: Item) -> Any:
    """What identifies an image's object for the cache: its mask file (path, size, mtime) or box."""
    if item.mask:
        try:
            st = os.stat(item.mask)
            return ["mask", item.mask, st.st_size, st.st_mtime_ns]
        except OSError:
            return ["mask-missing", item.mask, item.box]
    return ["box", list(item.box)] if item.box is not None else None


@dataclass
class ObjectSet:
    """The objects of a batch in input coordinates: masks (B,H,W), whether each image has one,
    its kind (mask | box | None) and the problems met (listed in the stage's output)."""

    masks: torch.Tensor
    present: torch.Tensor
    kinds: list[str | None]
    boxes: torch.Tensor


def batch_objects(items: Sequence[Item], sizes: Sequence[tuple[int, int]], transform: Any,
                  hw: tuple[int, int], problems: list[dict[str, str]]) -> ObjectSet:
    """Each image's object: its mask where it has a usable one, else its box (clipped), else none.
    A bad mask or box is reported in ``problems`` with a warning and the image scored without it."""
    h, w = hw
    masks = torch.zeros(len(items), h, w, dtype=torch.bool)
    boxes = torch.full((len(items), 4), math.nan, dtype=torch.float64)
    kinds: list[str | None] = []
    for i, (it, size) in enumerate(zip(items, sizes)):
        kind = None
        if it.box is not None:
            x0, y0, x1, y1 = it.box
            inside = min(x1, size[0]) > max(x0, 0) and min(y1, size[1]) > max(y0, 0)
            box = input_box(it.box, size, transform, hw) if inside else None
            if not inside:
                problems.append({"path": it.path, "problem": f"box {tuple(it.box)} lies outside the image"})
                log.warning("explain: the box of %s lies outside the image; scored without it", it.path)
            elif (x0 < 0 or y0 < 0 or x1 > size[0] or y1 > size[1]) and box is not None:
                problems.append({"path": it.path, "problem": f"box {tuple(it.box)} clipped to the image"})
                log.warning("explain: the box of %s reaches outside the image; clipped to it", it.path)
            if box is not None:
                boxes[i] = torch.tensor(box, dtype=torch.float64)
                kind = "box"
        if it.mask:
            try:
                masks[i] = input_mask(it.mask, size, transform, hw)
                kind = "mask"
                if not math.isfinite(float(boxes[i, 0])) and masks[i].any():
                    ys, xs = torch.nonzero(masks[i], as_tuple=True)
                    boxes[i] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float64)
            except ValueError as err:
                problems.append({"path": it.path, "problem": str(err)})
                log.warning("explain: %s; %s is scored %s", err, it.path, "with its box" if kind else "without a mask")
        kinds.append(kind)
    boxed = torch.tensor([k == "box" for k in kinds], dtype=torch.bool)
    if bool(boxed.any()):  # the images scored with their box: all their masks in one call
        masks[boxed] = box_masks(boxes[boxed], h, w)
    present = torch.tensor([k is not None for k in kinds]) & masks.flatten(1).any(1)
    return ObjectSet(masks, present, kinds, boxes)


def score_batch(maps: torch.Tensor, objects: ObjectSet, box_threshold: float) -> dict[str, np.ndarray]:
    """In-object energy, pointing hit and box IoU of each map (NaN for an image without an object)."""
    nan = np.full(len(maps), np.nan)
    if not bool(objects.present.any()):
        return {"inside_energy": nan, "pointing_hit": nan.copy(), "box_iou": nan.copy()}
    keep = objects.present.numpy()
    energy = np.where(keep, inside_energy(maps, objects.masks).numpy(), np.nan)
    hit = np.where(keep, pointing_mask(maps, objects.masks).numpy().astype(float), np.nan)
    iou = np.full(len(maps), np.nan)
    idx = np.flatnonzero(keep & np.isfinite(objects.boxes[:, 0].numpy()))
    if len(idx):
        pred = cam_box(maps[idx], box_threshold)
        iou[idx] = torch.diagonal(box_iou(pred, objects.boxes[idx])).numpy()
    return {"inside_energy": energy, "pointing_hit": hit, "box_iou": iou}


class SplitExplainer:
    """Every method's maps and scores for a list of images, through the map store."""

    def __init__(self, ctx: Context, ecfg: DictConfig, methods: dict[str, MapMethod], map_size: int) -> None:
        self.ctx, self.ecfg, self.methods, self.map_size = ctx, ecfg, methods, map_size
        m = ecfg.metrics
        self.scoring = {"box_threshold": float(m.box_threshold), "steps": int(m.steps),
                        "deletion_baseline": str(m.deletion_baseline), "insertion_baseline": str(m.insertion_baseline)}
        self.stores = {name: MapStore(ctx.cache.root, name, map_store_key(
            name, method.version, method.key_settings(), ctx.model.key, map_size, self.scoring), map_size)
            for name, method in methods.items()}
        self.problems: list[dict[str, str]] = []
        self._indexes: dict[str, pd.DataFrame] = {}

    def index(self, name: str) -> pd.DataFrame:
        """The index of method ``name``'s store, read once until :meth:`run` writes to it."""
        if name not in self._indexes:
            self._indexes[name] = self.stores[name].index()
        return self._indexes[name]

    def stored_predictions(self) -> dict[str, int]:
        """image_id -> the model's predicted class, from the rows any method's store holds."""
        out: dict[str, int] = {}
        for name in self.stores:
            index = self.index(name)
            out.update(zip(index["image_id"].astype(str), index["prediction"].astype(int)))
        return out

    def run(self, items: Sequence[Item], targets: Sequence[int | None], predictions: Sequence[int | None],
            curves: set[str], per_call: int, progress: bool = True) -> pd.DataFrame:
        """One row per image x method: ids, target, object kind, scores, whether it was cached.
        ``curves``: the image ids that also get deletion and insertion curves. A target of None is
        the image's predicted class, not known yet: the pass that makes its maps predicts it (no
        separate prediction pass); every prediction is then in :attr:`predicted`."""
        keys = {name: [None if t is None else row_key(it.image_id, t, [object_digest(it), it.image_id in curves])
                       for it, t in zip(items, targets)] for name in self.methods}
        known = {name: set(self.index(name)["row_key"]) for name in self.stores}
        todo = {name: {i for i, k in enumerate(keys[name]) if k is None or k not in known[name]}
                for name in self.methods}
        pending = sorted(set().union(*todo.values()))
        self.predicted = {it.image_id: int(p) for it, p in zip(items, predictions) if p is not None}
        groups = [[i for i in pending if targets[i] is not None], [i for i in pending if targets[i] is None]]
        buffers: dict[str, list[pd.DataFrame]] = {name: [] for name in self.methods}
        with tqdm(total=len(pending), desc="explain", unit="img", disable=None if progress else True) as bar:
            try:
                for group in groups:
                    for start in range(0, len(group), per_call):
                        chunk = group[start:start + per_call]
                        self._chunk(chunk, items, targets, keys, curves, todo, buffers)
                        bar.update(len(chunk))
            finally:
                for name in self.methods:
                    self._flush(name, buffers, force=True)
                self._indexes.clear()
        resolved = [t if t is not None else self.predicted[it.image_id] for it, t in zip(items, targets)]
        frames = []
        for name, store in self.stores.items():
            got = store.read(keys[name], columns=["kind", *SCORES])
            got = got.set_index("row_key").reindex(keys[name])
            frames.append(pd.DataFrame({
                "image_id": [it.image_id for it in items], "path": [it.path for it in items], "row_key": keys[name],
                "label": pd.array([it.label for it in items], dtype="Int64"), "target": resolved,
                "method": name, "object": got["kind"].to_numpy(), "cached": [k in known[name] for k in keys[name]],
                **{s: got[s].to_numpy(dtype=float) for s in SCORES}}))
        return pd.concat(frames, ignore_index=True)

    def _chunk(self, chunk: list[int], items: Sequence[Item], targets: Sequence[int | None],
               keys: dict[str, list[str | None]], curves: set[str], todo: dict[str, set[int]],
               buffers: dict[str, list[pd.DataFrame]]) -> None:
        """Maps, scores and store rows of the images ``chunk`` for the methods that need them;
        when their targets are unknown (all None), the predicted classes, from the same pass."""
        bundle = self.ctx.model
        pictures = [load_image(items[i].path) for i in chunk]
        x = torch.stack([bundle.transform(p) for p in pictures])
        objects = batch_objects([items[i] for i in chunk], [p.size for p in pictures], bundle.transform,
                                tuple(x.shape[-2:]), self.problems)
        blind = targets[chunk[0]] is None
        if blind:
            wanted = {name: list(range(len(chunk))) for name in self.methods}
            shared = self._shared_pass(wanted, x, None)
            tgt = torch.cat([q.targets for q in shared[0]]).cpu() if shared is not None else self._predict(x)
            for j, i in enumerate(chunk):
                self.predicted[items[i].image_id] = int(tgt[j])
                key = row_key(items[i].image_id, int(tgt[j]), [object_digest(items[i]), items[i].image_id in curves])
                for name in self.methods:
                    keys[name][i] = key
        else:
            tgt = torch.tensor([targets[i] for i in chunk])
            wanted = {name: [j for j, i in enumerate(chunk) if i in todo[name]] for name in self.methods}
            shared = self._shared_pass({n: w for n, w in wanted.items() if w}, x, tgt)
        packed: dict[tuple[int, ...], list[bytes]] = {}  # object bits, shared by methods with the same images
        for name in self.methods:
            sel = wanted[name]
            if not sel:
                continue
            maps = self._maps(name, x[sel], tgt[sel], [items[chunk[j]] for j in sel], shared, sel)
            sub = ObjectSet(objects.masks[sel], objects.present[sel], [objects.kinds[j] for j in sel],
                            objects.boxes[sel])
            scores = score_batch(maps, sub, self.scoring["box_threshold"])
            scores.update(self._curves(name, x[sel], tgt[sel], maps, [items[chunk[j]].image_id in curves
                                                                         for j in sel]))
            small = shrink(maps, self.map_size)
            if tuple(sel) not in packed:
                packed[tuple(sel)] = encode_objects(sub.masks.where(sub.present[:, None, None], False),
                                                    tuple(small.shape[1:]), len(sel))
            buffers[name].append(pd.DataFrame({
                "row_key": [keys[name][chunk[j]] for j in sel], "image_id": [items[chunk[j]].image_id for j in sel],
                "target": tgt[sel].numpy(), "prediction": [self.predicted[items[chunk[j]].image_id] for j in sel],
                "kind": sub.kinds, **scores,
                "h": small.shape[1], "w": small.shape[2], "map": encode_maps(small), "thumb": encode_maps(thumbs(maps)),
                "object": packed[tuple(sel)]}))
            self._flush(name, buffers)

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted classes of a batch by a plain forward pass (when no shared pass ran)."""
        with torch.no_grad():
            return self.ctx.model.module(x.to(self.ctx.device)).argmax(1).cpu()

    def _shared_pass(self, wanted: dict[str, list[int]], x: torch.Tensor, target: torch.Tensor | None
                     ) -> Passes | None:
        """One forward/backward pass serving every method that can take its maps from it, over the
        images any of them needs: the passes (one per :func:`pass_size` images, kept apart so that
        their layer outputs and gradients are never joined: each method's maps are) and those
        images' positions in ``x``. ``target`` None predicts the classes in the same pass. None
        when no method shares (or only one, with the targets known: its own call costs the same),
        or when the pass fails (each method then runs on its own, image by image where it fails, so
        the error names the image)."""
        needs = [self.methods[n].shared_needs() for n in wanted]
        shared = [nd for nd in needs if nd is not None]
        if len(shared) < (1 if target is None else 2):
            return None
        rows = sorted(set().union(*(wanted[n] for n, nd in zip(wanted, needs) if nd is not None)))
        union = shared[0]
        for nd in shared[1:]:
            union = union | nd
        xs, ts = x[rows].to(self.ctx.device), None if target is None else target[rows]
        step = pass_size(self.ctx.model.module, xs)
        try:
            return [shared_pass(self.ctx.model.module, xs[i:i + step], None if ts is None else ts[i:i + step], union)
                    for i in range(0, len(rows), step)], rows
        except Exception as err:  # noqa: BLE001 - each method retries on its own and names the image
            log.warning("explain: the shared pass failed (%s: %s); running each method on its own",
                        type(err).__name__, err)
            return None

    def _maps(self, name: str, x: torch.Tensor, target: torch.Tensor, items: list[Item],
              shared: Passes | None = None, sel: list[int] | None = None) -> torch.Tensor:
        """The method's maps for a batch (CPU, float32): from the shared pass when it serves this
        method, else from its own batched call, image by image when that fails, so the error names
        the image."""
        method = self.methods[name]
        maps = None
        if shared is not None and sel is not None and method.shared_needs() is not None:
            passes, rows = shared
            where = {r: k for k, r in enumerate(rows)}
            idx = torch.tensor([where[j] for j in sel], dtype=torch.long)  # rising, as sel and rows are
            parts, start = [], 0
            for p in passes:
                n = p.x.shape[0]
                local = idx[(idx >= start) & (idx < start + n)] - start
                if len(local):
                    part = p if len(local) == n else p.subset(local)
                    parts.append(method.from_pass(self.ctx.model.module, part).maps)
                start += n
            maps = torch.cat(parts)
        if maps is None:
            maps = self._own_maps(name, x, target, items)
        maps = maps.detach().float().cpu()
        bad = ~torch.isfinite(maps.flatten(1)).all(1)
        if bool(bad.any()):
            it = items[int(bad.nonzero()[0, 0])]
            raise PipelineError(f"explain: {name} gave a map with NaN or infinite values for image {it.path}; "
                                "check the model's output on it, or drop the method.")
        return maps

    def _own_maps(self, name: str, x: torch.Tensor, target: torch.Tensor, items: list[Item]) -> torch.Tensor:
        """The method's own batched call, image by image when the batch fails."""
        module, dev = self.ctx.model.module, self.ctx.device
        try:
            return self.methods[name].attribute(module, x.to(dev), target).maps
        except PipelineError:
            raise
        except Exception:
            parts = []
            for i, it in enumerate(items):
                try:
                    parts.append(self.methods[name].attribute(module, x[i:i + 1].to(dev), target[i:i + 1]).maps)
                except Exception as err:
                    raise PipelineError(f"explain: {name} failed on image {it.path} (id {it.image_id[:12]}): "
                                        f"{type(err).__name__}: {err}. Every map computed before it is stored; "
                                        f"leave the image out of the split or drop {name}.") from err
            return torch.cat(parts)

    def _curves(self, name: str, x: torch.Tensor, target: torch.Tensor, maps: torch.Tensor,
                wanted: list[bool]) -> dict[str, np.ndarray]:
        """Deletion and insertion AUC of the wanted images, each game one batched call."""
        out = {"deletion_auc": np.full(len(maps), np.nan), "insertion_auc": np.full(len(maps), np.nan)}
        idx = [i for i, w in enumerate(wanted) if w]
        if not idx or self.methods[name].produces_mask:
            return out
        module, dev, s = self.ctx.model.module, self.ctx.device, self.scoring
        xs, ts, ms = x[idx].to(dev), target[idx].to(dev), maps[idx].to(dev)
        bs = int(self.ecfg.batch_size)
        out["deletion_auc"][idx] = deletion(module, xs, ts, ms, steps=s["steps"], baseline=s["deletion_baseline"],
                                            batch_size=bs).auc.cpu().numpy()
        out["insertion_auc"][idx] = insertion(module, xs, ts, ms, steps=s["steps"],
                                              baseline=s["insertion_baseline"], batch_size=bs).auc.cpu().numpy()
        return out

    def _flush(self, name: str, buffers: dict[str, list[pd.DataFrame]], force: bool = False) -> None:
        rows = sum(len(b) for b in buffers[name])
        if rows and (force or rows >= PART_ROWS):
            self.stores[name].write(pd.concat(buffers[name], ignore_index=True))
            buffers[name].clear()


def curve_images(items: Sequence[Item], classes: Sequence[int], per_class: int) -> set[str]:
    """The image ids that get deletion/insertion curves: the first ``per_class`` of each class in
    the split's order (chosen before sharding, so every shard agrees)."""
    taken: dict[int, int] = {}
    out = set()
    for it, c in zip(items, classes):
        if taken.get(c, 0) < per_class:
            taken[c] = taken.get(c, 0) + 1
            out.add(it.image_id)
    return out


def reliance_rules(rcfg: DictConfig) -> Rules:
    """``explain.reliance``'s flag rules (SpRAy off when ``strategies.enabled`` is false)."""
    spray = plain(rcfg.strategies)
    enabled = bool(spray.pop("enabled", True))
    return Rules(outside_share=float(rcfg.outside_share), k=float(rcfg.flag.k), min_gap=float(rcfg.flag.min_gap),
                 min_images=int(rcfg.flag.min_images), spray=spray if enabled else None)


@dataclass
class Split:
    """The images of a split with their predictions (-1 outside this shard when they were not
    known before), and which of them this shard handles."""

    items: list[Item]
    predicted: np.ndarray
    keep: np.ndarray
    per_call: int


def explain_split(ctx: Context, ecfg: DictConfig, names: list[str], split: Any,
                  shard: int = 0, num_shards: int = 1) -> tuple[pd.DataFrame, SplitExplainer, Split]:
    """Maps and scores of every image of ``split`` (this shard's part) for ``names``, through the
    map store; the scores table gets each image's class (label, else prediction) and prediction."""
    bundle = ctx.model
    bundle.module.eval()
    preds = Predictions(ctx, int(ecfg.batch_size))
    items = select_images(ctx, DictConfig({"all": True, "split": split}), preds)
    x0 = bundle.transform(load_image(items[0].path))[None].to(ctx.device)
    explainer = SplitExplainer(ctx, ecfg, build_methods(ctx, ecfg, names, x0), int(ecfg.reliance.map_size))
    per_class = int(ecfg.metrics.curves_per_class)
    keep = np.ones(len(items), bool) if num_shards == 1 else \
        shard_of([it.image_id for it in items], num_shards) == shard
    chosen = np.flatnonzero(keep)
    # Predicted classes are known from an activation store or from stored maps; the others come from
    # the pass that makes the maps, unless the curves' choice of images needs them first.
    if str(ecfg.target) == "predicted" and (per_class == 0 or all(it.label is not None for it in items)):
        known = {**explainer.stored_predictions(), **preds.store_predictions()}
        predictions: list[int | None] = [known.get(it.image_id) for it in items]
    else:
        predictions = [int(p) for p in preds.predicted(items)]
    targets = [None if p is None else resolve_target(ecfg.target, it, p, bundle.class_names)
               for it, p in zip(items, predictions)]
    curves = curve_images(items, [it.label if it.label is not None else p for it, p in zip(items, predictions)],
                          per_class) if per_class else set()
    per_call = images_per_call(ecfg.images_per_call, x0)
    scores = explainer.run([items[i] for i in chosen], [targets[i] for i in chosen],
                           [predictions[i] for i in chosen], curves, per_call, ctx.progress)
    predicted = np.array([explainer.predicted.get(it.image_id, -1) for it in items], dtype=np.int64)
    per_image = pd.DataFrame({"image_id": [items[i].image_id for i in chosen],
                              "class": [items[i].label if items[i].label is not None else int(predicted[i])
                                        for i in chosen],
                              "prediction": predicted[chosen], "split": [items[i].split for i in chosen]})
    return scores.merge(per_image, on="image_id", how="left"), explainer, Split(items, predicted, keep, per_call)
