"""stage=explain: per-image explanation maps for selected images, cached, paneled and scored.

Images are chosen by :mod:`pipeline.selection` (``explain.select``). Every method in
``explain.methods`` comes from the method registry (:mod:`pipeline.methods.registry`) with its
config block (``explain.<method>``); images go through each method in batches of
``explain.images_per_call`` and every image x method map, its overlay and its meta are cached as an
artifact (:mod:`pipeline.artifacts`): a re-run reads them back and changing one method's setting
recomputes only that method. One side-by-side panel per image goes into the run folder, with
``explain/artifacts.parquet`` (one row per image x method) for the report stage. On images with
ground-truth boxes every map is scored: pointing game, box accuracy, deletion and insertion AUC,
beside a centre-point baseline (``explain/metrics.json``, printed as a table).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from PIL import Image

from pipeline.artifacts import Artifact, artifact_key, display_settings, read_artifact, write_artifact
from pipeline.cache import atomic_write_json, make_key
from pipeline.data.images import load_image
from pipeline.errors import PipelineError, suggest
from pipeline.methods.base import Explanation, MapMethod
from pipeline.methods.cam import cam_box
from pipeline.methods.metrics import box_iou, box_masks, center_map, deletion, inside_energy, insertion, pointing_game
from pipeline.explaining import build_methods, curve_images, explain_split, images_per_call, method_names, \
    reliance_rules
from pipeline.pictures import Tile, display_image, panel
from pipeline.reliance.assess import assess
from pipeline.reliance.backgrounds import causal_section
from pipeline.runtime import Context, show
from pipeline.selection import Item, Predictions, input_box, resolve_target, select_images

log = logging.getLogger(__name__)

METRICS_VERSION = 2  # 2: in-box energy
SCORE_COLUMNS = ("pointing_hit", "inside_energy", "box_iou", "box_hit", "deletion_auc", "insertion_auc")


# ------------------------------------------------------------------------------------------------
# Methods and their artifacts


class Explainer:
    """Reads each method's artifacts from the cache and computes the missing ones in batches."""

    def __init__(self, ctx: Context, ecfg: DictConfig, methods: dict[str, MapMethod]) -> None:
        self.ctx = ctx
        self.ecfg = ecfg
        self.methods = methods
        self.cmap = str(ecfg.overlay.cmap)
        self.alpha = float(ecfg.overlay.alpha)
        if self.cmap not in matplotlib.colormaps:
            raise PipelineError(f"explain.overlay.cmap={self.cmap} is not a matplotlib colormap."
                                f"{suggest(self.cmap, list(matplotlib.colormaps))}")
        self.display = display_settings(self.cmap, self.alpha)

    def keys(self, name: str, item: Item, target: int) -> tuple[dict[str, Any], str, str]:
        """(params, map key, artifact key) of one image x method."""
        method, model_key = self.methods[name], self.ctx.model.key
        params = {**method.key_settings(), "target": target}
        return (params, artifact_key(name, method.version, params, model_key, item.image_id),
                artifact_key(name, method.version, params, model_key, item.image_id, self.display))

    def artifacts(self, name: str, items: list[Item], x: torch.Tensor, images: list[np.ndarray],
                  targets: list[int]) -> list[Artifact]:
        """The artifact of method ``name`` for each image (``x``: (B,C,H,W) on the CPU): cache hits
        are read, the rest computed in one batched call (image by image if that call fails)."""
        out: list[Artifact | None] = []
        todo: list[int] = []
        for i, it in enumerate(items):
            hit = read_artifact(self.ctx.cache, name, self.keys(name, it, targets[i])[2])
            out.append(hit)
            if hit is None:
                todo.append(i)
        if todo:
            try:
                exp = self._attribute(name, x[todo], [targets[i] for i in todo])
                for j, i in enumerate(todo):
                    out[i] = self._write(name, items[i], images[i], targets[i], exp, j)
            except PipelineError:
                raise
            except Exception:  # one image may be at fault: compute one by one, keeping what succeeds
                for i in todo:
                    out[i] = out[i] or self._write(name, items[i], images[i], targets[i],
                                                   self._one(name, items[i], x[i:i + 1], targets[i]), 0)
        return [a for a in out if a is not None]

    def _attribute(self, name: str, x: torch.Tensor, targets: list[int]) -> Explanation:
        module = self.ctx.model.module
        return self.methods[name].attribute(module, x.to(self.ctx.device), torch.tensor(targets))

    def _one(self, name: str, item: Item, x: torch.Tensor, target: int) -> Explanation:
        try:
            return self._attribute(name, x, [target])
        except PipelineError:
            raise
        except Exception as err:
            raise PipelineError(f"explain: {name} failed on image {item.path} (id {item.image_id[:12]}): "
                                f"{type(err).__name__}: {err}. Every artifact computed before it is cached; "
                                f"leave the image out (explain.select) or drop {name} from explain.methods.") from err

    def _write(self, name: str, item: Item, image: np.ndarray, target: int, exp: Explanation, j: int) -> Artifact:
        """Write image ``j`` of a batch's explanation as this image's artifact."""
        params, map_key, key = self.keys(name, item, target)
        bundle = self.ctx.model
        raw = exp.maps[j].detach().float().cpu().numpy()
        if not np.isfinite(raw).all():
            raise PipelineError(f"explain: {name} gave a map with NaN or infinite values for image {item.path}; "
                                "check the model's output on it, or drop the method.")
        meta = {"version": self.methods[name].version, "params": params, "map_key": map_key,
                "display": self.display, "model": bundle.name, "model_key": bundle.key, "image_id": item.image_id,
                "path": item.path, "target": target, "target_name": bundle.class_names[target],
                **(exp.meta[j] if exp.meta else {})}
        extras = {k: v[j].detach().float().cpu().numpy() for k, v in exp.extras.items()}
        return write_artifact(self.ctx.cache, name, key, raw, image, meta, extras, self.cmap, self.alpha)


# ------------------------------------------------------------------------------------------------
# Metrics


def metric_params(mcfg: DictConfig) -> dict[str, Any]:
    return {"box_threshold": float(mcfg.box_threshold), "iou": float(mcfg.iou), "steps": int(mcfg.steps),
            "deletion_baseline": str(mcfg.deletion_baseline), "insertion_baseline": str(mcfg.insertion_baseline)}


def score_map(ctx: Context, method: str, source_key: str, raw: np.ndarray, box: tuple[float, ...], x: torch.Tensor,
              target: int, mparams: dict[str, Any], ranking: bool = True, curves: bool = True) -> dict[str, float]:
    """In-box energy, pointing hit, box IoU and hit, and (with ``curves``) deletion and insertion
    AUC of one map, cached under ``metrics/<method>`` by the map's key, the box and the metric
    parameters. A 0/1 mask (``ranking`` false) gets no pointing hit and no curves."""
    key = make_key(kind="explain_metrics", version=METRICS_VERSION, source=source_key, box=list(box),
                   params=mparams, curves=curves and ranking, ranking=ranking)
    kind = f"metrics/{method}"
    folder = ctx.cache.get(kind, key, fanout=True)
    if folder is not None:
        return json.loads((folder / "metrics.json").read_text())
    m = torch.from_numpy(np.asarray(raw, dtype=np.float32))[None]
    gt = torch.tensor([box], dtype=torch.float64)
    pred_box = cam_box(m[0], mparams["box_threshold"])
    iou = float(box_iou(pred_box[None], gt)[0, 0])
    out = {"box_iou": iou, "box_hit": float(iou >= mparams["iou"]),
           "inside_energy": float(inside_energy(m, box_masks(gt, *m.shape[-2:]))[0]),
           "pred_box": [int(v) for v in pred_box.tolist()], "pointing_hit": math.nan,
           "deletion_auc": math.nan, "insertion_auc": math.nan}
    if ranking:
        out["pointing_hit"] = float(pointing_game(m, gt)[0])
    if ranking and curves:
        mt = m.to(x.device)
        out["deletion_auc"] = float(deletion(ctx.model.module, x, target, mt, steps=mparams["steps"],
                                             baseline=mparams["deletion_baseline"]).auc[0])
        out["insertion_auc"] = float(insertion(ctx.model.module, x, target, mt, steps=mparams["steps"],
                                               baseline=mparams["insertion_baseline"]).auc[0])
    with ctx.cache.write(kind, key, {"method": method}, fanout=True) as tmp:
        atomic_write_json(tmp / "metrics.json", out)
    return out


def summarize_metrics(rows: pd.DataFrame) -> pd.DataFrame:
    """Per method: images scored, pointing rate, in-box energy, box accuracy, mean IoU, mean
    deletion/insertion AUC (over the images that got curves)."""
    scored = rows[rows["box_iou"].notna()]
    return scored.groupby("method", sort=False).agg(
        images=("box_iou", "size"), pointing=("pointing_hit", "mean"), inside_energy=("inside_energy", "mean"),
        box_accuracy=("box_hit", "mean"),
        mean_iou=("box_iou", "mean"), deletion_auc=("deletion_auc", "mean"),
        insertion_auc=("insertion_auc", "mean"))


# ------------------------------------------------------------------------------------------------
# The stage


def _panel_name(item: Item) -> str:
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(item.path).stem)[:40]
    return f"{stem}_{item.image_id[:8]}.png"


def print_causal(rows: list[dict[str, Any]], causal: dict[str, Any]) -> None:
    """The causal table, as the per-class reliance table is printed."""
    if not rows:
        show(f"\ncausal reliance: {causal.get('note', 'no rows')}")
        return
    cols = ["class_name", "images", "accuracy", "object_only_retention", "context_only_retention", "mixed_same",
            "mixed_rand", "bg_gap", "flagged"]
    show(f"\ncausal reliance (predictions on variants, fill={causal['fill']}):")
    show(pd.DataFrame(rows)[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def run_split(ctx: Context) -> dict[str, Any]:
    """``explain.select.all``: every image of the split, scored; per-class reliance when unsharded."""
    ecfg = ctx.cfg.explain
    names = method_names(ecfg)
    shard, num_shards = int(ctx.cfg.shard), int(ctx.cfg.num_shards)
    out_dir = ctx.run_dir / "explain"
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    scores, explainer, split = explain_split(ctx, ecfg, names, ecfg.select.get("split"), shard, num_shards)
    rules = reliance_rules(ecfg.reliance)
    causal: dict[str, Any] | None = None
    if bool(ecfg.causal.enabled):
        causal, _ = causal_section(ctx, ecfg.causal, rules, split.items, split.predicted, split.keep, split.per_call,
                                   out_dir / "reliance" if num_shards == 1 else None)
    seconds = time.perf_counter() - start
    table_path = out_dir / "scores.parquet"
    scores.to_parquet(table_path, index=False)
    computed = int((~scores["cached"]).sum())
    result: dict[str, Any] = {"images": int(scores["image_id"].nunique()), "methods": ",".join(names),
                              "maps_computed": computed, "maps_cached": int(scores["cached"].sum()),
                              "images_per_s": round(scores["image_id"].nunique() / max(seconds, 1e-9), 2),
                              "scores": str(table_path), "object_problems": len(explainer.problems)}
    if explainer.problems:
        atomic_write_json(out_dir / "object_problems.json", explainer.problems)
    if num_shards > 1:
        result["note"] = (f"shard {shard} of {num_shards} written to the map store; stage=audit (or this stage "
                          "unsharded) reads every shard's maps")
        return result
    section = assess(scores, explainer.stores, ctx.model.class_names, rules, int(ctx.cfg.seed), out_dir / "reliance",
                     ctx.model, str(ecfg.overlay.cmap), float(ecfg.overlay.alpha))
    section["object_problems"] = explainer.problems
    if causal is not None:
        section["causal"] = causal.pop("rows")
        section["causal_check"] = causal
        section["flagged_classes"] = list(dict.fromkeys([*section["flagged_classes"], *causal["flagged_classes"]]))
        print_causal(section["causal"], causal)
    atomic_write_json(out_dir / "reliance.json", section)
    table = pd.DataFrame(section["per_class"])
    if not table.empty:
        cols = ["class_name", "method", "images", "inside_energy", "pointing", "outside_fraction", "flagged"]
        show(f"\nreliance per class on {result['images']} images ({section['rule']}):")
        show(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    result.update(reliance=str(out_dir / "reliance.json"), flagged_classes=section["flagged_classes"])
    return result


def run(ctx: Context) -> dict[str, Any]:
    """Select images, write each image x method artifact and each image's panel, score the maps."""
    ecfg = ctx.cfg.explain
    if ecfg.select.get("all"):
        return run_split(ctx)
    names = method_names(ecfg)
    bundle = ctx.model
    bundle.module.eval()
    preds = Predictions(ctx, int(ecfg.batch_size))
    items = select_images(ctx, ecfg.select, preds)
    preds.forward(items)
    out_dir = ctx.run_dir / "explain"
    (out_dir / "panels").mkdir(parents=True, exist_ok=True)
    targets = [resolve_target(ecfg.target, it, int(preds.probs[it.image_id].argmax()), bundle.class_names)
               for it in items]
    x0 = bundle.transform(load_image(items[0].path))[None].to(ctx.device)
    explainer = Explainer(ctx, ecfg, build_methods(ctx, ecfg, names, x0))
    per_call = images_per_call(ecfg.images_per_call, x0)
    classes = [it.label if it.label is not None else int(preds.probs[it.image_id].argmax()) for it in items]
    curves = curve_images(items, classes, int(ecfg.metrics.curves_per_class))
    rows: list[dict[str, Any]] = []
    engines: dict[str, set[str]] = {name: set() for name in names}  # the engines the artifacts say they used
    for start in range(0, len(items), per_call):
        chunk, chunk_targets = items[start:start + per_call], targets[start:start + per_call]
        pictures = [load_image(it.path) for it in chunk]
        x = torch.stack([bundle.transform(img) for img in pictures])
        shown = [display_image(xi, bundle.mean, bundle.std) for xi in x]
        arts = {name: explainer.artifacts(name, chunk, x, shown, chunk_targets) for name in names}
        for name in names:
            engines[name].update(str(a.meta["engine_used"]) for a in arts[name] if "engine_used" in a.meta)
        for i, it in enumerate(chunk):
            box = None
            if it.box is not None and bool(ecfg.metrics.enabled):
                box = input_box(it.box, pictures[i].size, bundle.transform, tuple(x.shape[-2:]))
            rows += image_rows(ctx, explainer, it, x[i], shown[i], preds.probs[it.image_id], chunk_targets[i], box,
                               {name: arts[name][i] for name in names}, out_dir / "panels" / _panel_name(it),
                               it.image_id in curves)
    return write_outputs(ctx, explainer, pd.DataFrame(rows), out_dir, len(items), engines)


def image_rows(ctx: Context, explainer: Explainer, item: Item, x_cpu: torch.Tensor, image: np.ndarray,
               probs: np.ndarray, target: int, box: tuple[float, float, float, float] | None,
               arts: dict[str, Artifact], panel_path: Path, curves: bool) -> list[dict[str, Any]]:
    """One image's table rows (one per method, scored given a box, and the centre baseline) and its panel."""
    bundle, ecfg = ctx.model, explainer.ecfg
    names = bundle.class_names
    mparams = metric_params(ecfg.metrics)
    x = x_cpu[None].to(ctx.device)
    pred = int(probs.argmax())
    label_name = names[item.label] if item.label is not None else None
    base = {"image_id": item.image_id, "path": item.path, "split": item.split, "selected_by": item.reason,
            "label": item.label, "label_name": label_name, "prediction": pred, "prediction_name": names[pred],
            "score": float(probs[pred]), "target": target, "target_name": names[target],
            "target_prob": float(probs[target]), "panel_path": str(panel_path)}
    tiles = [Tile("input", Image.fromarray(image), [("lime", box)] if box else [])]
    rows = []
    for name, art in arts.items():
        scores: dict[str, Any] = {}
        if box is not None:
            scores = score_map(ctx, name, art.meta["map_key"], art.map, box, x, target, mparams,
                               ranking=not explainer.methods[name].produces_mask, curves=curves)
        title = name + (" (localizer)" if art.meta.get("converted") else "")
        outline = [("white", scores["pred_box"])] if "pred_box" in scores else []
        tiles.append(Tile(title, Image.open(art.overlay_path).convert("RGB"), outline))
        rows.append({**base, "method": name, "key": art.key, "artifact_dir": str(art.folder),
                     "map_path": str(art.map_path), "overlay_path": str(art.overlay_path), "cached": art.cached,
                     **{k: scores.get(k, math.nan) for k in SCORE_COLUMNS}})
    if box is not None:
        hw = tuple(x.shape[-2:])
        source = make_key(kind="center", image=item.image_id, model=bundle.key, target=target, hw=list(hw))
        scores = score_map(ctx, "center", source, center_map(*hw).numpy(), box, x, target, mparams,
                            curves=curves)
        rows.append({**base, "method": "center (baseline)", "key": None, "artifact_dir": None, "map_path": None,
                     "overlay_path": None, "cached": None, **{k: scores[k] for k in SCORE_COLUMNS}})
    header = (f"{Path(item.path).name}   label: {label_name or '-'}   pred: {names[pred]} ({probs[pred]:.2f})"
              f"   target: {names[target]}")
    panel(tiles, header, int(ecfg.panel.tile_size)).save(panel_path)
    return rows


def write_outputs(ctx: Context, explainer: Explainer, table: pd.DataFrame, out_dir: Path, n_images: int,
                  engines: dict[str, set[str]]) -> dict[str, Any]:
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
    metrics: dict[str, Any] = {"images": n_images, "target": str(ecfg.target), "params": metric_params(ecfg.metrics),
                               "methods": {}, "engines": {}, "conversions": {}}
    for name, method in explainer.methods.items():
        if engines[name]:
            metrics["engines"][name] = {"requested": str(method.settings.get("engine")), "used": sorted(engines[name])}
        conversion = method.conversion_facts()
        if conversion:
            metrics["conversions"][name] = conversion
            result[f"{name}_conversion"] = conversion
            result[f"{name}_localizer_accuracy"] = round(conversion["converted_accuracy"], 4)
            result["original_accuracy"] = round(conversion["original_accuracy"], 4)
            show(f"\n{name} localizer at {conversion['layer']}: accuracy {conversion['converted_accuracy']:.3f} "
                  f"(original model {conversion['original_accuracy']:.3f}, on {conversion['evaluated_on']} images)")
    if table["box_iou"].notna().any():
        summary = summarize_metrics(table)
        metrics["methods"] = {m: {k: (None if pd.isna(v) else float(v)) for k, v in r.items()}
                              for m, r in summary.iterrows()}
        show(f"\nexplanation quality on {int(summary['images'].max())} images with boxes (target: {ecfg.target}, "
              f"box threshold {ecfg.metrics.box_threshold}):")
        show(summary.to_string(float_format=lambda v: f"{v:.3f}"))
        result["quality"] = metrics["methods"]
    metrics_path = out_dir / "metrics.json"
    atomic_write_json(metrics_path, metrics)
    result["metrics"] = str(metrics_path)
    return result
