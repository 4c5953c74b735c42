"""stage=explain: per-image explanation maps for selected images, cached, paneled and scored.

Images are chosen by id or path, by a neuron's top-k from the activation store, by class, as the
most confidently misclassified, or as a seeded random sample (``explain.select``). For each image
and method (saliency, smoothgrad, occlusion, cam, gradcam, segmentation) the map, its overlay and
its meta are cached as an artifact (``pipeline.artifacts``): a re-run reads them back and changing
one method's parameter recomputes only that method. One side-by-side panel per image goes into the
run folder, with ``explain/artifacts.parquet`` (one row per image x method) for the report stage.
On images with ground-truth boxes every map is scored: pointing game, box accuracy, deletion and
insertion AUC, beside a centre-point baseline (``explain/metrics.json``, printed as a table).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn
from torchvision import transforms as T

from pipeline.artifacts import (Artifact, Tile, artifact_key, cached_artifact, display_image, display_settings,
                                panel)
from pipeline.cache import atomic_write_json, make_key
from pipeline.data.images import load_image, scan_file
from pipeline.errors import PipelineError, suggest
from pipeline.methods.cam import (GapHead, GapLocalizer, cam, cam_box, find_gap_head, fit_gap_head,
                                  last_feature_map, pooled_features)
from pipeline.methods.gradcam import gradcam
from pipeline.methods.hooks import forward_until, require_conv_output
from pipeline.methods.metrics import box_iou, center_map, deletion, insertion, pointing_game
from pipeline.methods.krypton import ApproximateEngine, low_precision_active
from pipeline.methods.occlusion import ENGINES, FILLS, resolve_engine, occlusion
from pipeline.methods.saliency import saliency
from pipeline.methods.segmentation import fraction_mask, grabcut_mask, quantile_mask
from pipeline.runtime import Context
from pipeline.store import layer_dirname

log = logging.getLogger(__name__)

METHODS = ("saliency", "smoothgrad", "occlusion", "cam", "gradcam", "segmentation")
VERSIONS = {"saliency": 1, "smoothgrad": 1, "occlusion": 1, "cam": 1, "gradcam": 1, "segmentation": 1}
LOCALIZER_VERSION = 1
METRICS_VERSION = 1
SEGMENTATION_MODES = ("grabcut", "fraction", "quantile")
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


def _item(rec: pd.Series, reason: str) -> Item:
    label = rec.get("label")
    box = tuple(float(rec[c]) for c in ("box_x0", "box_y0", "box_x1", "box_y1")) if "box_x0" in rec else None
    return Item(str(rec["image_id"]), str(rec["path"]), None if pd.isna(label) else int(label),
                str(rec.get("split", "all")), None if box is None or any(math.isnan(v) for v in box) else box,
                reason)


def _adhoc_item(path: Path, reason: str) -> Item | None:
    """An image file outside the dataset, validated like the dataset's files; None if unusable."""
    res = scan_file(path)
    if res.image_id is None:
        log.warning("explain: skipping %s: %s", path, res.reason)
        return None
    return Item(res.image_id, str(path.resolve()), None, "adhoc", None, reason)


def _class_index(value: Any, names: Sequence[str], what: str) -> int:
    """A class given by index or name, checked against ``names``."""
    if isinstance(value, (int, np.integer)) or (isinstance(value, str) and value.lstrip("-").isdigit()):
        idx = int(value)
        if not 0 <= idx < len(names):
            raise PipelineError(f"{what}: class {idx} is out of range: the model has {len(names)} classes "
                                f"(0..{len(names) - 1}). Pick a class index in that range or a class name.")
        return idx
    if str(value) in names:
        return list(names).index(str(value))
    raise PipelineError(f"{what}: unknown class {value!r}.{suggest(str(value), names)} Give a class index "
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
    """The images to explain, in order: ids, paths, query, classes, misclassified, random."""
    records = labelled_records(ctx)
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
            add(_item(hits.iloc[0], "id"))
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
                add(_item(hits.iloc[0], "path"))
            elif hits.empty and p.is_file():
                add(_adhoc_item(p, "path"))
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
        c = _class_index(value, names, "explain.select.classes")
        if pool["label"].notna().any():
            of_class = pool[pool["label"] == c]
        else:
            items = [_item(r, "") for _, r in pool.iterrows()]
            of_class = pool[preds.predicted(items) == c]
        take = min(int(scfg.get("per_class", 4)), len(of_class))
        for i in np.sort(rng.choice(len(of_class), size=take, replace=False)):
            add(_item(of_class.iloc[int(i)], f"class {names[c]}"))
    n_wrong = scfg.get("misclassified")
    n_wrong = (0 if explicit else DEFAULT_MISCLASSIFIED) if n_wrong is None else int(n_wrong)
    if n_wrong > 0:
        for item in _misclassified(pool, preds, n_wrong):
            add(item)
    n_random = scfg.get("random")
    n_random = (0 if explicit else DEFAULT_RANDOM) if n_random is None else int(n_random)
    rest = pool[~pool["image_id"].isin(list(chosen))]
    for i in np.sort(rng.choice(len(rest), size=min(n_random, len(rest)), replace=False)):
        add(_item(rest.iloc[int(i)], "random"))
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
            items.append(_item(by_id.loc[row.image_id], reason))
        elif Path(row.path).is_file():
            item = _adhoc_item(Path(row.path), reason)
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
    items = [_item(r, "misclassified") for _, r in labelled.iterrows()]
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
    return _class_index(spec, names, "explain.target")


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
    x0, x1 = max(0.0, x0), min(float(w), x1)
    y0, y1 = max(0.0, y0), min(float(h), y1)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


# ------------------------------------------------------------------------------------------------
# Methods


@dataclass
class CamSetup:
    """What CAM reads: the model (the original, or a converted GAP localizer) and its head."""

    model: nn.Module
    head: GapHead
    layer: str
    converted: dict[str, Any] | None


def _plain(cfg: Any) -> dict[str, Any]:
    """A config node as a plain dict (for keys and JSON)."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})


def _choice(key: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` as a string when it is one of ``choices``, else a clear error naming the key."""
    value = str(value)
    if value not in choices:
        raise PipelineError(f"{key}={value} is not valid.{suggest(value, choices)} Use one of {', '.join(choices)}.")
    return value


class Explainer:
    """Computes or reads each method's artifact for one image; method setup happens once per run."""

    def __init__(self, ctx: Context, ecfg: DictConfig, methods: list[str], x0: torch.Tensor) -> None:
        self.ctx = ctx
        self.ecfg = ecfg
        self.methods = methods
        self.module = ctx.model.module
        self.cmap = str(ecfg.overlay.cmap)
        self.alpha = float(ecfg.overlay.alpha)
        if self.cmap not in matplotlib.colormaps:
            raise PipelineError(f"explain.overlay.cmap={self.cmap} is not a matplotlib colormap."
                                f"{suggest(self.cmap, list(matplotlib.colormaps))}")
        self.display = display_settings(self.cmap, self.alpha)
        self.head: GapHead | None = None
        self.no_head_reason = ""
        try:
            self.head = find_gap_head(self.module, x0)
        except PipelineError as err:
            self.no_head_reason = str(err)
        self.cam: CamSetup | None = self._setup_cam(x0) if "cam" in methods else None
        self.gradcam_layer = self._setup_gradcam(x0) if "gradcam" in methods else None
        self.occlusion = self._setup_occlusion() if "occlusion" in methods else None
        self.segmentation = self._setup_segmentation() if "segmentation" in methods else None

    # -- setup --------------------------------------------------------------------------------

    def _conv_layer(self, layer: str, x0: torch.Tensor, method: str) -> str:
        """``layer`` after checking that it outputs a (B,C,H,W) map on ``x0``."""
        with torch.no_grad():
            act = forward_until(self.module, layer, x0)
        require_conv_output(act, layer, self.module, method)
        return layer

    def _setup_cam(self, x0: torch.Tensor) -> CamSetup:
        ccfg = self.ecfg.cam
        convert = str(ccfg.convert)
        if convert not in ("auto", "never"):
            raise PipelineError(f"explain.cam.convert={convert} is not valid: use auto or never.")
        layer = ccfg.get("layer")
        if layer is not None:
            layer = self._conv_layer(str(layer), x0, "CAM")
        if self.head is not None and layer in (None, self.head.layer):
            return CamSetup(self.module, self.head, self.head.layer, None)
        if convert == "never":
            if self.head is None:
                raise PipelineError(f"{self.no_head_reason} With explain.cam.convert=auto the explain stage "
                                    "does this conversion itself (it fits only the new linear layer).")
            raise PipelineError(f"explain.cam.layer={layer} is not the layer the model's GAP head reads "
                                f"('{self.head.layer}'), so plain CAM does not apply there. Use "
                                f"explain.cam.layer=null, or explain.cam.convert=auto to fit a GAP localizer at "
                                f"'{layer}'.")
        layer = layer or last_feature_map(self.module, x0)
        return self._convert(layer)

    def _convert(self, layer: str) -> CamSetup:
        """The GAP localizer at ``layer``: its Linear fitted on training images' pooled features and
        cached in ``cache/models/<key>/`` with its accuracy beside the original model's."""
        ctx, bundle = self.ctx, self.ctx.model
        fit = _plain(self.ecfg.cam.fit)
        builtin = ctx.cfg.model.source == "builtin"
        data = ctx.training_data() if builtin else ctx.dataset
        key = make_key(kind="cam_localizer", version=LOCALIZER_VERSION, model=bundle.key, layer=layer,
                       data=data.key, fit=fit)
        folder = ctx.cache.get("models", key)
        if folder is None:
            recs = data.records if builtin else labelled_records(ctx)
            info, state = self._fit_localizer(layer, data.name, recs, fit)
            with ctx.cache.write("models", key, {"kind": "cam_localizer", **info}) as tmp:
                torch.save(state, tmp / "head.pt")
                atomic_write_json(tmp / "metrics.json", info)
            folder = ctx.cache.path("models", key)
            cached = False
        else:
            cached = True
        info = json.loads((folder / "metrics.json").read_text())
        state = torch.load(folder / "head.pt", map_location="cpu", weights_only=True)
        fc = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
        fc.load_state_dict(state)
        localizer = GapLocalizer(self.module, layer, fc.to(ctx.device)).eval()
        info = {**info, "key": key, "folder": str(folder), "cached": cached}
        log.info("explain: CAM on a GAP localizer at %s (accuracy %.3f, original %.3f)", layer,
                 info["converted_accuracy"], info["original_accuracy"])
        return CamSetup(localizer, localizer.head, layer, info)

    def _fit_localizer(self, layer: str, data_name: str, records: pd.DataFrame, fit: dict[str, Any]
                       ) -> tuple[dict[str, Any], dict]:
        """Fit the localizer's Linear on the training images (labels as model class indices); its
        accuracy and the original model's on the test images."""
        bundle = self.ctx.model
        recs = records[records["label"].notna()]
        if recs.empty:
            raise PipelineError(f"the CAM conversion fits a linear layer on labelled images, but dataset "
                                f"{data_name} has no labels of the model's classes. Use data with labels, or "
                                "Grad-CAM (explain.methods without cam), or explain.cam.convert=never.")
        train, test = recs[recs["split"] == "train"], recs[recs["split"] == "test"]
        evaluated_on = "test"
        if train.empty:
            train, test, evaluated_on = recs, recs, "train (no train/test split)"
        elif test.empty:
            test, evaluated_on = train, "train (no test split)"
        log.info("explain: converting %s for CAM at %s: fitting a linear layer on %d images", bundle.name, layer,
                 len(train))
        f_train, source = self._pooled(layer, train)
        y_train = torch.as_tensor(train["label"].to_numpy(dtype=np.int64))
        fc = fit_gap_head(f_train, y_train, bundle.num_classes, **fit)
        f_test, _ = self._pooled(layer, test)
        y_test = test["label"].to_numpy(dtype=np.int64)
        with torch.no_grad():
            converted = (fc(f_test.float()).argmax(1).numpy() == y_test).mean()
        items = [_item(r, "") for _, r in test.iterrows()]
        preds = Predictions(self.ctx, int(self.ecfg.batch_size))
        preds.forward(items)
        original = (np.array([preds.probs[it.image_id].argmax() for it in items]) == y_test).mean()
        info = {"layer": layer, "original_accuracy": float(original), "converted_accuracy": float(converted),
                "evaluated_on": evaluated_on, "train_images": len(train), "test_images": len(test),
                "features_from": source, "model": bundle.name}
        return info, fc.state_dict()

    def _pooled(self, layer: str, recs: pd.DataFrame) -> tuple[torch.Tensor, str]:
        """Spatial means of ``layer`` for ``recs``: the store's ``mean_*`` columns when it has the layer
        and every image, else a forward pass."""
        from_store = _store_pooled(self.ctx, layer, recs["image_id"].astype(str).tolist())
        if from_store is not None:
            return from_store, "store"
        bundle, out = self.ctx.model, []
        paths = recs["path"].tolist()
        step = 256
        for start in range(0, len(paths), step):
            x = torch.stack([bundle.transform(load_image(p)) for p in paths[start:start + step]])
            out.append(pooled_features(self.module, layer, x, batch_size=int(self.ecfg.batch_size)))
        return torch.cat(out), "forward pass"

    def _setup_gradcam(self, x0: torch.Tensor) -> str:
        layer = self.ecfg.gradcam.get("layer")
        if layer is None:
            return self.head.layer if self.head is not None else last_feature_map(self.module, x0)
        return self._conv_layer(str(layer), x0, "Grad-CAM")

    def _setup_occlusion(self) -> dict[str, Any]:
        ocfg = self.ecfg.occlusion
        engine = _choice("explain.occlusion.engine", ocfg.engine, ENGINES)
        _choice("explain.occlusion.fill", ocfg.fill, FILLS)
        params: dict[str, Any] = {"window": int(ocfg.window), "stride": int(ocfg.stride), "fill": str(ocfg.fill)}
        if params["fill"] == "constant":
            params["fill_value"] = float(ocfg.fill_value)
        if params["fill"] == "blur":
            params["blur_sigma"] = float(ocfg.blur_sigma)
        options = _plain(ocfg.approximate) if engine == "approximate" else {}
        if engine == "approximate":
            # the bfloat16 change path runs only where it is native, so the key says whether it ran
            wanted = options.get("low_precision", ApproximateEngine.DEFAULTS["low_precision"])
            active = bool(wanted) and low_precision_active(self.ctx.device)
            params["mode"] = {"approximate": {**options, "low_precision": active}}
        else:
            params["mode"] = "exact"
        return {"engine": engine, "params": params, "options": options, "batch_size": int(ocfg.batch_size)}

    def _setup_segmentation(self) -> dict[str, Any]:
        scfg = self.ecfg.segmentation
        mode = _choice("explain.segmentation.mode", scfg.mode, SEGMENTATION_MODES)
        keep = {"grabcut": ("fg_quantile", "bg_quantile"), "fraction": ("fraction",), "quantile": ("quantile",)}[mode]
        return {"mode": mode, **{k: float(scfg[k]) for k in keep}}

    # -- per image ----------------------------------------------------------------------------

    def params(self, method: str) -> dict[str, Any]:
        """The parameters that change ``method``'s map (besides the target, model and image)."""
        if method == "saliency":
            return {}
        if method == "smoothgrad":
            s = self.ecfg.smoothgrad
            return {"samples": int(s.samples), "noise": float(s.noise), "seed": int(s.seed)}
        if method == "occlusion":
            return self.occlusion["params"]
        if method == "cam":
            conv = self.cam.converted
            return {"layer": self.cam.layer, "fc": self.cam.head.fc, "localizer": conv["key"] if conv else None}
        if method == "gradcam":
            return {"layer": self.gradcam_layer}
        if method == "segmentation":
            return {**self.segmentation, "saliency": self.params("saliency")}
        raise AssertionError(method)

    def artifact(self, method: str, item: Item, x: torch.Tensor, image: np.ndarray, target: int) -> Artifact:
        """The cached artifact of ``method`` for one image (``x``: (1,C,H,W) on the device)."""
        params = {**self.params(method), "target": target}
        map_key = artifact_key(method, VERSIONS[method], params, self.ctx.model.key, item.image_id)
        key = artifact_key(method, VERSIONS[method], params, self.ctx.model.key, item.image_id, self.display)

        def compute() -> tuple[np.ndarray, dict[str, Any], dict[str, np.ndarray]]:
            raw, extra_meta, extras = self._compute(method, item, x, image, target)
            meta = {"version": VERSIONS[method], "params": params, "map_key": map_key, "display": self.display,
                    "model": self.ctx.model.name,
                    "model_key": self.ctx.model.key, "image_id": item.image_id, "path": item.path,
                    "target": target, "target_name": self.ctx.model.class_names[target], **extra_meta}
            return raw, meta, extras

        return cached_artifact(self.ctx.cache, method, key, compute, image, self.cmap, self.alpha)

    def _compute(self, method: str, item: Item, x: torch.Tensor, image: np.ndarray, target: int
                 ) -> tuple[np.ndarray, dict[str, Any], dict[str, np.ndarray]]:
        if method in ("saliency", "smoothgrad"):
            s = self.ecfg.smoothgrad
            res = (saliency(self.module, x, target) if method == "saliency" else
                   saliency(self.module, x, target, samples=int(s.samples), noise=float(s.noise), seed=int(s.seed)))
            return _np(res.map[0]), {}, {"grad": _np(res.grad[0])}
        if method == "occlusion":
            occ = self.occlusion
            engine = resolve_engine(occ["engine"], self.module, x, **occ["options"])
            used = "plain (fallback, see log)" if getattr(engine, "graph", True) is None else occ["engine"]
            p = occ["params"]
            res = occlusion(self.module, x, target, window=p["window"], stride=p["stride"], fill=p["fill"],
                            fill_value=p.get("fill_value", 0.0), blur_sigma=p.get("blur_sigma", 5.0),
                            batch_size=occ["batch_size"], engine=engine)
            meta = {"engine": occ["engine"], "engine_used": used, "base_score": res.base_score,
                    "base_prob": res.base_prob, "positions": int(res.boxes.shape[0]),
                    "map": "score drop (target logit) averaged over the windows covering each pixel"}
            extras = {"prob": _np(res.prob), "grid_score_drop": _np(res.score_drop_grid),
                      "grid_prob": _np(res.prob_grid)}
            return _np(res.score_drop), meta, extras
        if method == "cam":
            raw = cam(self.cam.model, x, target, head=self.cam.head)
            return _np(raw[0]), {"layer": self.cam.layer, "converted": self.cam.converted is not None}, {}
        if method == "gradcam":
            return _np(gradcam(self.module, x, target, self.gradcam_layer)[0]), {"layer": self.gradcam_layer}, {}
        if method == "segmentation":
            sal = torch.from_numpy(self.artifact("saliency", item, x, image, target).map)[None]
            seg = self.segmentation
            if seg["mode"] == "grabcut":
                mask = grabcut_mask(x.detach().cpu().float(), sal, seg["fg_quantile"], seg["bg_quantile"])
            elif seg["mode"] == "fraction":
                mask = fraction_mask(sal, seg["fraction"])
            else:
                mask = quantile_mask(sal, seg["quantile"])
            return _np(mask[0].float()), {"source": "saliency"}, {}
        raise AssertionError(method)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _store_pooled(ctx: Context, layer: str, image_ids: list[str]) -> torch.Tensor | None:
    """Pooled features (N,C) of ``layer`` for ``image_ids`` read from the activation store's Parquet
    ``mean_*`` columns, or None when there is no store, it lacks the layer, or misses an image."""
    try:
        store = ctx.store()
    except PipelineError:
        return None
    if layer not in store.layers():
        return None
    columns = [f"mean_{c}" for c in range(store.channels(layer))]
    table = ds.dataset(store.root / layer_dirname(layer), format="parquet").to_table(columns=["row_id", *columns])
    images = store.images()
    row_of = dict(zip(images["image_id"].astype(str), images["row_id"]))
    if any(i not in row_of for i in image_ids):
        return None
    position = pd.Series(np.arange(table.num_rows), index=table.column("row_id").to_numpy())
    rows = [row_of[i] for i in image_ids]
    if not position.index.is_unique or any(r not in position.index for r in rows):
        return None
    idx = position.loc[rows].to_numpy()
    values = np.stack([table.column(c).to_numpy().astype(np.float32)[idx] for c in columns], axis=1)
    log.info("explain: pooled features of %s for %d images read from the activation store", layer, len(rows))
    return torch.from_numpy(values)


# ------------------------------------------------------------------------------------------------
# Metrics


def _metric_params(mcfg: DictConfig) -> dict[str, Any]:
    return {"box_threshold": float(mcfg.box_threshold), "iou": float(mcfg.iou), "steps": int(mcfg.steps),
            "deletion_baseline": str(mcfg.deletion_baseline), "insertion_baseline": str(mcfg.insertion_baseline)}


def score_map(ctx: Context, method: str, source_key: str, raw: np.ndarray, box: tuple[float, ...], x: torch.Tensor,
              target: int, mparams: dict[str, Any], curves: bool = True) -> dict[str, float]:
    """Pointing hit, box IoU and hit, deletion and insertion AUC of one map, cached under
    ``metrics/<method>`` by the map's key, the box and the metric parameters."""
    key = make_key(kind="explain_metrics", version=METRICS_VERSION, source=source_key, box=list(box),
                   params=mparams, curves=curves)
    kind = f"metrics/{method}"
    folder = ctx.cache.get(kind, key, fanout=True)
    if folder is not None:
        return json.loads((folder / "metrics.json").read_text())
    m = torch.from_numpy(np.asarray(raw, dtype=np.float32))[None]
    gt = torch.tensor([box], dtype=torch.float64)
    pred_box = cam_box(m[0], mparams["box_threshold"])
    iou = float(box_iou(pred_box[None], gt)[0, 0])
    out = {"box_iou": iou, "box_hit": float(iou >= mparams["iou"]),
           "pred_box": [int(v) for v in pred_box.tolist()], "pointing_hit": math.nan,
           "deletion_auc": math.nan, "insertion_auc": math.nan}
    if curves:
        out["pointing_hit"] = float(pointing_game(m, gt)[0])
        mt = m.to(x.device)
        out["deletion_auc"] = float(deletion(ctx.model.module, x, target, mt, steps=mparams["steps"],
                                             baseline=mparams["deletion_baseline"]).auc[0])
        out["insertion_auc"] = float(insertion(ctx.model.module, x, target, mt, steps=mparams["steps"],
                                               baseline=mparams["insertion_baseline"]).auc[0])
    with ctx.cache.write(kind, key, {"method": method}, fanout=True) as tmp:
        atomic_write_json(tmp / "metrics.json", out)
    return out


def summarize_metrics(rows: pd.DataFrame) -> pd.DataFrame:
    """Per method: images scored, pointing rate, box accuracy, mean IoU, mean deletion/insertion AUC."""
    scored = rows[rows["box_iou"].notna()]
    table = scored.groupby("method", sort=False).agg(
        images=("box_iou", "size"), pointing=("pointing_hit", "mean"), box_accuracy=("box_hit", "mean"),
        mean_iou=("box_iou", "mean"), deletion_auc=("deletion_auc", "mean"),
        insertion_auc=("insertion_auc", "mean"))
    return table


# ------------------------------------------------------------------------------------------------
# The stage


def _methods(ecfg: DictConfig) -> list[str]:
    methods = [str(m) for m in ecfg.methods]
    for m in methods:
        if m not in METHODS:
            raise PipelineError(f"unknown explain method '{m}'.{suggest(m, METHODS)} Methods: {', '.join(METHODS)}.")
    if not methods:
        raise PipelineError(f"explain.methods is empty: list some of {', '.join(METHODS)}.")
    return list(dict.fromkeys(methods))


def _panel_name(item: Item) -> str:
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(item.path).stem)[:40]
    return f"{stem}_{item.image_id[:8]}.png"


SCORE_COLUMNS = ("pointing_hit", "box_iou", "box_hit", "deletion_auc", "insertion_auc")


def run(ctx: Context) -> dict[str, Any]:
    """Select images, write each image x method artifact and each image's panel, score the maps."""
    ecfg = ctx.cfg.explain
    methods = _methods(ecfg)
    bundle = ctx.model
    bundle.module.eval()
    preds = Predictions(ctx, int(ecfg.batch_size))
    items = select_images(ctx, ecfg.select, preds)
    preds.forward(items)
    out_dir = ctx.run_dir / "explain"
    (out_dir / "panels").mkdir(parents=True, exist_ok=True)
    pictures = [load_image(it.path) for it in items]
    x_all = torch.stack([bundle.transform(img) for img in pictures])
    targets = [resolve_target(ecfg.target, it, int(preds.probs[it.image_id].argmax()), bundle.class_names)
               for it in items]
    explainer = Explainer(ctx, ecfg, methods, x_all[:1].to(ctx.device))
    rows: list[dict[str, Any]] = []
    for i, it in enumerate(items):
        box = None
        if it.box is not None and bool(ecfg.metrics.enabled):
            box = input_box(it.box, pictures[i].size, bundle.transform, tuple(x_all.shape[-2:]))
        rows += explain_image(ctx, explainer, it, x_all[i], preds.probs[it.image_id], targets[i], box,
                              out_dir / "panels" / _panel_name(it))
    return write_outputs(ctx, explainer, pd.DataFrame(rows), out_dir, len(items))


def explain_image(ctx: Context, explainer: Explainer, item: Item, x_cpu: torch.Tensor, probs: np.ndarray,
                  target: int, box: tuple[float, float, float, float] | None, panel_path: Path
                  ) -> list[dict[str, Any]]:
    """Every method's artifact (and scores, given a box) for one image, and its panel; table rows."""
    bundle, ecfg = ctx.model, explainer.ecfg
    names = bundle.class_names
    mparams = _metric_params(ecfg.metrics)
    x = x_cpu[None].to(ctx.device)
    image = display_image(x_cpu, bundle.mean, bundle.std)
    pred = int(probs.argmax())
    label_name = names[item.label] if item.label is not None else None
    base = {"image_id": item.image_id, "path": item.path, "split": item.split, "selected_by": item.reason,
            "label": item.label, "label_name": label_name, "prediction": pred, "prediction_name": names[pred],
            "score": float(probs[pred]), "target": target, "target_name": names[target],
            "target_prob": float(probs[target]), "panel_path": str(panel_path)}
    tiles = [Tile("input", Image.fromarray(image), [("lime", box)] if box else [])]
    rows = []
    for method in explainer.methods:
        art = explainer.artifact(method, item, x, image, target)
        scores: dict[str, Any] = {}
        if box is not None:
            scores = score_map(ctx, method, art.meta["map_key"], art.map, box, x, target, mparams,
                               curves=method != "segmentation")
        title = method + (" (localizer)" if method == "cam" and explainer.cam.converted else "")
        outline = [("white", scores["pred_box"])] if "pred_box" in scores else []
        tiles.append(Tile(title, Image.open(art.overlay_path).convert("RGB"), outline))
        rows.append({**base, "method": method, "key": art.key, "artifact_dir": str(art.folder),
                     "map_path": str(art.map_path), "overlay_path": str(art.overlay_path), "cached": art.cached,
                     **{k: scores.get(k, math.nan) for k in SCORE_COLUMNS}})
    if box is not None:
        hw = tuple(x.shape[-2:])
        source = make_key(kind="center", image=item.image_id, model=bundle.key, target=target, hw=list(hw))
        scores = score_map(ctx, "center", source, center_map(*hw).numpy(), box, x, target, mparams)
        rows.append({**base, "method": "center (baseline)", "key": None, "artifact_dir": None, "map_path": None,
                     "overlay_path": None, "cached": None, **{k: scores[k] for k in SCORE_COLUMNS}})
    header = (f"{Path(item.path).name}   label: {label_name or '-'}   pred: {names[pred]} ({probs[pred]:.2f})"
              f"   target: {names[target]}")
    panel(tiles, header, int(ecfg.panel.tile_size)).save(panel_path)
    return rows


def write_outputs(ctx: Context, explainer: Explainer, table: pd.DataFrame, out_dir: Path, n_images: int
                  ) -> dict[str, Any]:
    """artifacts.parquet, metrics.json and the printed quality table; returns the stage summary."""
    ecfg = explainer.ecfg
    table["label"] = table["label"].astype("Int64")
    table["cached"] = table["cached"].astype("boolean")  # NA on the centre-baseline rows
    table_path = out_dir / "artifacts.parquet"
    table.to_parquet(table_path, index=False)
    arts = table[table["key"].notna()]
    cached = arts["cached"].astype(bool)
    result: dict[str, Any] = {"images": n_images, "methods": ",".join(explainer.methods),
                              "artifacts_computed": int((~cached).sum()), "artifacts_cached": int(cached.sum()),
                              "panels": str(out_dir / "panels"), "table": str(table_path)}
    conversion = explainer.cam.converted if explainer.cam is not None else None
    metrics: dict[str, Any] = {"images": n_images, "target": str(ecfg.target), "params": _metric_params(ecfg.metrics),
                               "methods": {}, "cam_conversion": conversion}
    if explainer.occlusion is not None:
        used = {json_meta(f).get("engine_used", "?") for f in arts[arts["method"] == "occlusion"]["artifact_dir"]}
        metrics["occlusion_engine"] = {"requested": str(ecfg.occlusion.engine), "used": sorted(used)}
    if conversion:
        result["cam_localizer_accuracy"] = round(conversion["converted_accuracy"], 4)
        result["original_accuracy"] = round(conversion["original_accuracy"], 4)
        result["cam_conversion"] = conversion
        print(f"\nCAM localizer at {conversion['layer']}: accuracy {conversion['converted_accuracy']:.3f} "
              f"(original model {conversion['original_accuracy']:.3f}, on {conversion['evaluated_on']} images)")
    if table["box_iou"].notna().any():
        summary = summarize_metrics(table)
        metrics["methods"] = {m: {k: (None if pd.isna(v) else float(v)) for k, v in r.items()}
                              for m, r in summary.iterrows()}
        metrics["targets"] = _targets(metrics["methods"])
        print(f"\nexplanation quality on {int(summary['images'].max())} images with boxes (target: {ecfg.target}, "
              f"box threshold {ecfg.metrics.box_threshold}):")
        print(summary.to_string(float_format=lambda v: f"{v:.3f}"))
        result["quality"] = metrics["methods"]
    metrics_path = out_dir / "metrics.json"
    atomic_write_json(metrics_path, metrics)
    result["metrics"] = str(metrics_path)
    return result


def json_meta(folder: str) -> dict[str, Any]:
    """An artifact's meta.json."""
    return json.loads((Path(folder) / "meta.json").read_text())


def _targets(per_method: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's quality bars, where the methods were scored: pointing >= 0.9 for CAM and Grad-CAM,
    CAM box accuracy >= 0.8."""
    out: dict[str, Any] = {}
    for m in ("cam", "gradcam"):
        if m in per_method and per_method[m]["pointing"] is not None:
            out[f"{m}_pointing>=0.9"] = per_method[m]["pointing"] >= 0.9
    if "cam" in per_method:
        out["cam_box_accuracy>=0.8"] = per_method["cam"]["box_accuracy"] >= 0.8
    return out
