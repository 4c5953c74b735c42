"""Which images a stage works on: selection by id, path, a neuron's top-k, class, misclassification
or a seeded sample; their predictions; class lookup by index or name; the explained class; and
ground-truth boxes carried into the model's input coordinates.

Shared by the stages that pick images (explain, and the reliance and causal checks built on it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from pipeline.data.images import load_image, scan_file
from pipeline.errors import PipelineError, suggest
from pipeline.runtime import Context

log = logging.getLogger(__name__)

DEFAULT_RANDOM = 8
DEFAULT_MISCLASSIFIED = 2
# Transforms that do not move pixels, so ground-truth boxes pass through them unchanged.
NON_GEOMETRIC = (T.ToTensor, T.PILToTensor, T.Normalize, T.Grayscale, T.ConvertImageDtype, T.Lambda)


# ------------------------------------------------------------------------------------------------
# Selection


@dataclass
class Item:
    """One selected image: its record and why it was selected."""

    image_id: str
    path: str
    label: int | None
    split: str
    box: tuple[float, float, float, float] | None
    reason: str
    mask: str | None = None


def record_item(rec: pd.Series | dict[str, Any], reason: str) -> Item:
    """The item of one dataset record (a row's Series, or its dict: cheaper over a whole split)."""
    label = rec.get("label")
    box = tuple(float(rec[c]) for c in ("box_x0", "box_y0", "box_x1", "box_y1")) if "box_x0" in rec else None
    mask = rec.get("mask")
    return Item(str(rec["image_id"]), str(rec["path"]), None if pd.isna(label) else int(label),
                str(rec.get("split", "all")), None if box is None or any(math.isnan(v) for v in box) else box,
                reason, None if mask is None or pd.isna(mask) else str(mask))


def adhoc_item(path: Path, reason: str) -> Item | None:
    """An image file outside the dataset, validated like the dataset's files; None if unusable."""
    res = scan_file(path)
    if res.image_id is None:
        log.warning("explain: skipping %s: %s", path, res.reason)
        return None
    return Item(res.image_id, str(path.resolve()), None, "adhoc", None, reason)


def class_index(value: Any, names: Sequence[str], what: str) -> int:
    """A class given by index or name (exact, else case-insensitive), checked against ``names``."""
    names = list(names)
    if isinstance(value, str) and value in names:
        return names.index(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) or \
            (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        idx = int(value)
        if not 0 <= idx < len(names):
            raise PipelineError(f"{what}: class {idx} is out of range: the model has {len(names)} classes "
                                f"(0..{len(names) - 1}). Pick a class index in that range or a class name.")
        return idx
    lower: dict[str, int] = {}
    for i, name in enumerate(names):
        lower.setdefault(name.lower(), i)
    if str(value).strip().lower() in lower:
        return lower[str(value).strip().lower()]
    raise PipelineError(f"{what}: unknown class name {str(value)!r}.{suggest(str(value), names)} Give a class index "
                        f"(0..{len(names) - 1}) or one of the model's class names.")


class Predictions:
    """Class probabilities of images, by image id: from the activation store's images table when it
    has them (predicted class only), else from batched forward passes (cached for the run)."""

    def __init__(self, ctx: Context, batch_size: int) -> None:
        self.ctx = ctx
        self.batch_size = batch_size
        self.probs: dict[str, np.ndarray] = {}
        self._stored: dict[str, int] | None = None

    def store_predictions(self) -> dict[str, int]:
        """image_id -> predicted class from the store, or {} when there is no store for this model."""
        if self._stored is None:
            try:
                df = self.ctx.store().images()
                self._stored = dict(zip(df["image_id"].astype(str), df["prediction"].astype(int)))
            except PipelineError:  # no store yet: predictions come from forward passes
                self._stored = {}
        return self._stored

    def forward(self, items: Sequence[Item]) -> None:
        """Compute (and keep) the probabilities of the items not seen yet."""
        todo = [it for it in items if it.image_id not in self.probs]
        bundle = self.ctx.model
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            x = torch.stack([bundle.transform(load_image(it.path)) for it in chunk]).to(self.ctx.device)
            with torch.no_grad():
                p = bundle.module(x).float().softmax(1).cpu().numpy()
            for it, row in zip(chunk, p):
                self.probs[it.image_id] = row

    def predicted(self, items: Sequence[Item]) -> np.ndarray:
        """Predicted class of each item, from the store where it has the image."""
        known = self.store_predictions()
        self.forward([it for it in items if it.image_id not in known])
        return np.array([int(known[it.image_id]) if it.image_id in known else int(self.probs[it.image_id].argmax())
                         for it in items], dtype=np.int64)


def _candidates(records: pd.DataFrame, split: str | None) -> pd.DataFrame:
    """Records of ``split`` (all records for None/'all', or when the dataset has no such split)."""
    if split in (None, "all"):
        return records
    chosen = records[records["split"] == split]
    if chosen.empty:
        log.info("explain: the dataset has no '%s' split; selecting from all %d images", split, len(records))
        return records
    return chosen


def labelled_records(ctx: Context) -> pd.DataFrame:
    """The dataset's records with labels as the model's class indices (NA where not a model class)."""
    records = ctx.dataset.records.copy()
    records["label"] = ctx.store_records()["label"].to_numpy()
    return records


def select_images(ctx: Context, scfg: DictConfig, preds: Predictions) -> list[Item]:
    """The images to explain, in order: ids, paths, query, classes, misclassified, random; or
    every image of ``split`` when ``all`` is set (in the dataset's order)."""
    records = labelled_records(ctx)
    if scfg.get("all"):
        split = scfg.get("split")
        pool = records if split in (None, "all") else records[records["split"] == split]
        if pool.empty:
            splits = sorted(records["split"].astype(str).unique())
            raise PipelineError(f"explain.select.all: split '{split}' has no images in dataset {ctx.dataset.name}; "
                                f"its splits are {', '.join(splits)} (or all).")
        return [record_item(r, "all") for r in pool.drop_duplicates("image_id").to_dict("records")]
    chosen: dict[str, Item] = {}

    def add(item: Item | None) -> None:
        if item is not None and item.image_id not in chosen:
            chosen[item.image_id] = item

    missing: list[str] = []
    ids = [str(i) for i in (scfg.get("ids") or [])]
    all_ids = records["image_id"].astype(str)
    for want in ids:
        hits = records[all_ids.str.startswith(want)].drop_duplicates("image_id")
        if len(want) >= 8 and len(hits) == 1:
            add(record_item(hits.iloc[0], "id"))
        else:
            missing.append(f"id {want}" + (" (prefix matches several images)" if len(hits) > 1 else
                                           " (give 8 or more characters)" if len(want) < 8 else ""))
    paths = [str(p) for p in (scfg.get("paths") or [])]
    if paths:
        resolved = records["path"].map(lambda p: str(Path(p).resolve()))
        names = records["path"].map(lambda p: Path(p).name)
        stems = records["path"].map(lambda p: Path(p).stem)
        for want in paths:
            p = Path(want).expanduser()
            hits = records[resolved == str(p.resolve())]
            if hits.empty and not p.is_file():
                hits = records[(names == want) | (stems == want)]
            if len(hits) == 1:
                add(record_item(hits.iloc[0], "path"))
            elif hits.empty and p.is_file():
                add(adhoc_item(p, "path"))
            else:
                several = f" (the name matches {len(hits)} images; give the full path)" if len(hits) > 1 else ""
                missing.append(f"path {want}{several}")
    if missing:
        hint = suggest(paths[0], records["path"].map(lambda p: Path(p).name).tolist()) if paths else ""
        raise PipelineError(f"explain.select: images not found: {'; '.join(missing)}. Asked for ids {ids} and "
                            f"paths {paths} in dataset {ctx.dataset.name} ({len(records)} images).{hint} Give "
                            "image ids (or 8+ character prefixes), existing files, or file names in the dataset.")
    query = scfg.get("query") or {}
    if query.get("layer") is not None:
        for item in _query_items(ctx, query, records):
            add(item)
    pool = _candidates(records, scfg.get("split"))
    rng = np.random.default_rng(int(scfg.get("seed", 0)))
    explicit = bool(chosen) or bool(scfg.get("classes"))
    names = ctx.model.class_names
    for value in scfg.get("classes") or []:
        c = class_index(value, names, "explain.select.classes")
        if pool["label"].notna().any():
            of_class = pool[pool["label"] == c]
        else:
            items = [record_item(r, "") for _, r in pool.iterrows()]
            of_class = pool[preds.predicted(items) == c]
        take = min(int(scfg.get("per_class", 4)), len(of_class))
        for i in np.sort(rng.choice(len(of_class), size=take, replace=False)):
            add(record_item(of_class.iloc[int(i)], f"class {names[c]}"))
    n_wrong = scfg.get("misclassified")
    n_wrong = (0 if explicit else DEFAULT_MISCLASSIFIED) if n_wrong is None else int(n_wrong)
    if n_wrong > 0:
        for item in _misclassified(pool, preds, n_wrong):
            add(item)
    n_random = scfg.get("random")
    n_random = (0 if explicit else DEFAULT_RANDOM) if n_random is None else int(n_random)
    rest = pool[~pool["image_id"].isin(list(chosen))]
    for i in np.sort(rng.choice(len(rest), size=min(n_random, len(rest)), replace=False)):
        add(record_item(rest.iloc[int(i)], "random"))
    items = list(chosen.values())
    if scfg.get("limit") is not None:
        items = items[: int(scfg.limit)]
    if not items:
        raise PipelineError("explain.select chose no images: give explain.select.ids, paths, query.layer/channel, "
                            "classes, or a positive random / misclassified count.")
    return items


def _query_items(ctx: Context, query: Any, records: pd.DataFrame) -> list[Item]:
    """The top-k images of one neuron, from the activation store (which names stage=extract if missing)."""
    if query.get("channel") is None:
        raise PipelineError("explain.select.query.layer is set but query.channel is not: give both, e.g. "
                            "explain.select.query.layer=features.relu4 explain.select.query.channel=17.")
    store = ctx.store()
    table = store.topk(str(query.layer), int(query.channel), k=int(query.get("k", 8)), by=str(query.get("by", "max")))
    by_id = records.drop_duplicates("image_id").set_index("image_id", drop=False)
    items: list[Item] = []
    for rank, row in enumerate(table.itertuples(index=False), start=1):
        reason = f"top{rank} {query.layer}:{query.channel}"
        if row.image_id in by_id.index:
            items.append(record_item(by_id.loc[row.image_id], reason))
        elif Path(row.path).is_file():
            item = adhoc_item(Path(row.path), reason)
            if item is not None:
                items.append(item)
        else:
            log.warning("explain: store image %s is no longer at %s; skipped", row.image_id, row.path)
    return items


def _misclassified(pool: pd.DataFrame, preds: Predictions, n: int) -> list[Item]:
    """The ``n`` labelled images predicted wrongly with the highest confidence."""
    labelled = pool[pool["label"].notna()]
    if labelled.empty:
        log.info("explain: no labelled images, so no misclassified ones to select")
        return []
    items = [record_item(r, "misclassified") for _, r in labelled.iterrows()]
    predicted = preds.predicted(items)
    wrong = [it for it, p in zip(items, predicted) if p != it.label]
    preds.forward(wrong)
    wrong.sort(key=lambda it: -float(preds.probs[it.image_id].max()))
    return wrong[:n]


# ------------------------------------------------------------------------------------------------
# Targets and boxes


def resolve_target(spec: Any, item: Item, predicted: int, names: Sequence[str]) -> int:
    """The class to explain: 'predicted', 'label', or a fixed class index or name."""
    if spec == "predicted":
        return predicted
    if spec == "label":
        if item.label is None:
            raise PipelineError(f"explain.target=label but image {Path(item.path).name} has no label. Use "
                                "explain.target=predicted, or a dataset with labels.")
        if not 0 <= item.label < len(names):
            raise PipelineError(f"image {Path(item.path).name} has label {item.label}, out of range for a model "
                                f"with {len(names)} classes (0..{len(names) - 1}).")
        return item.label
    if isinstance(spec, str) and not spec.isdigit() and spec not in names:
        raise PipelineError(f"explain.target={spec} is not valid.{suggest(spec, ['predicted', 'label', *names])} "
                            "Use predicted, label, a class index or a class name.")
    return class_index(spec, names, "explain.target")


def geometric_steps(transform: Any) -> list[Any] | None:
    """The transforms that move pixels (Resize, CenterCrop), in order; None when another one does
    (its effect on boxes and masks is not known)."""
    steps = transform.transforms if isinstance(transform, T.Compose) else [transform]
    moving = [t for t in steps if not isinstance(t, NON_GEOMETRIC)]
    return moving if all(isinstance(t, (T.Resize, T.CenterCrop)) for t in moving) else None


def open_mask(path: str, size: tuple[int, int]) -> Image.Image:
    """An object mask PNG as a greyscale image, checked to be ``size`` (width, height), its image's
    size. Raises ValueError saying why when it cannot be used."""
    try:
        with Image.open(path) as im:
            mask = im.convert("L") if im.mode != "L" else im.copy()
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read mask {path}: {err}") from err
    if mask.size != tuple(size):
        raise ValueError(f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image is {size[0]}x{size[1]}")
    return mask


def input_mask(path: str, size: tuple[int, int], transform: Any, input_hw: tuple[int, int]) -> torch.Tensor:
    """An object mask PNG (nonzero = object) of an image of ``size`` (width, height) as a (H,W)
    bool tensor in the model's input coordinates, through the same Resize and CenterCrop as the
    image (nearest neighbour). Raises ValueError saying why when it cannot be used."""
    steps = geometric_steps(transform)
    if steps is None:
        raise ValueError("the model's transform moves pixels in a way masks cannot follow")
    mask = open_mask(path, size)
    for t in steps:
        if isinstance(t, T.Resize):
            mask = TF.resize(mask, t.size, interpolation=T.InterpolationMode.NEAREST, max_size=t.max_size)
        else:
            mask = TF.center_crop(mask, t.size)
    out = torch.from_numpy(np.asarray(mask) > 0)
    if tuple(out.shape) != tuple(input_hw):
        raise ValueError(f"mask {path} maps to {tuple(out.shape)}, not the input's {tuple(input_hw)}")
    return out


def input_box(box: Sequence[float], size: tuple[int, int], transform: Any,
              input_hw: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """A box (x0, y0, x1, y1) of the original image (``size`` = width, height) in the coordinates of
    the model's input, following Resize and CenterCrop; None when a transform moves pixels in a way
    this does not know."""
    steps = transform.transforms if isinstance(transform, T.Compose) else [transform]
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = size
    for t in steps:
        if isinstance(t, T.Resize):
            s = [t.size] if isinstance(t.size, int) else list(t.size)
            if len(s) == 1:
                short, long_ = (w, h) if w <= h else (h, w)
                new_short, new_long = s[0], int(s[0] * long_ / short)
                nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
            else:
                nh, nw = s
            x0, x1, y0, y1 = x0 * nw / w, x1 * nw / w, y0 * nh / h, y1 * nh / h
            w, h = nw, nh
        elif isinstance(t, T.CenterCrop):
            ch, cw = t.size if isinstance(t.size, (tuple, list)) else (t.size, t.size)
            top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
            x0, x1, y0, y1 = x0 - left, x1 - left, y0 - top, y1 - top
            w, h = cw, ch
        elif not isinstance(t, NON_GEOMETRIC):
            if isinstance(transform, T.Compose) or (w, h) != (input_hw[1], input_hw[0]):
                return None
    if (h, w) != tuple(input_hw):
        return None
    return clip_box((x0, y0, x1, y1), (w, h))


def clip_box(box: Sequence[float], size: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """A box (x0, y0, x1, y1) clipped to an image of ``size`` (width, height); None when nothing is left."""
    x0, y0 = max(0.0, float(box[0])), max(0.0, float(box[1]))
    x1, y1 = min(float(size[0]), float(box[2])), min(float(size[1]), float(box[3]))
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None
