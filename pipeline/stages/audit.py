"""stage=audit: what changed since the last audit, and whether it regressed (for cron and CI).

Compares the dataset, the activation store and the explain stage's scores with a previous audit
snapshot (``audit.baseline``: ``latest``, a snapshot folder, or null), writes
``<run>/audit/audit.json`` and ``<run>/audit/section.html`` (included in the run's report), and
saves a new snapshot under ``audit.snapshots``. It covers: files added, removed, changed or
relabelled; accuracy overall, per split and per class; prediction flips; localisation per class;
dead neurons; the neurons whose top-k image set changed most; dissected units (stage=dissect) whose
label changed or that lost their concept; k-NN outliers in the last extracted
layer; exact and near-duplicate pairs across splits (train/test leakage); and labels that disagree
with a confident prediction. ``audit.fail_on`` limits turn findings into a failure: the stage then
raises :class:`pipeline.audit.AuditFailed` after writing everything.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.audit import compare, pixels, snapshot
from pipeline.audit.html import render_section
from pipeline.cache import atomic_write_bytes, atomic_write_json
from pipeline.errors import AuditFailed, PipelineError, suggest
from pipeline.explaining import explain_split, method_names, reliance_rules
from pipeline.reliance.assess import assess, thumbs_table
from pipeline.reliance.backgrounds import causal_section
from pipeline.reliance.summary import drift
from pipeline.runtime import Context
from pipeline.store import ActivationStore
from pipeline.store.dissect import read_unit_labels

EMBEDDINGS = ("pixels", "features")
CHECKS = {
    "accuracy_drop": "accuracy dropped by {v:.3f} since the baseline (limit {l:g})",
    "flip_fraction": "{v:.1%} of the predictions flipped since the baseline (limit {l:.1%})",
    "duplicates_across_splits": "{v:g} duplicate file pairs across splits (limit {l:g})",
    "new_dead_neurons": "{v:g} neurons are newly dead (limit {l:g})",
    "label_noise": "{v:g} labels disagree with a confident prediction (limit {l:g})",
    "pointing_drop": "the pointing-game rate of an explanation method dropped by {v:.3f} (limit {l:g})",
    "flagged_classes": "{v:g} classes look away from their objects or use a second strategy (limit {l:g})",
    "object_only_drop": "a class's object-only retention dropped by {v:.3f} since the baseline: it leans more on "
                        "the background (limit {l:g})",
    "inside_energy_drop": "a class's in-object attribution energy dropped by {v:.3f} since the baseline (limit {l:g})",
}


# ---------------------------------------------------------------------------------- gathering ---

def current_images(ctx: Context, store: ActivationStore) -> pd.DataFrame:
    """The images table of this run: every dataset file with its store prediction and confidence."""
    recs = ctx.store_records().drop_duplicates("path").reset_index(drop=True)
    stored = store.images()
    conf = np.array([float(s[0]) if s is not None and len(s) else np.nan for s in stored["top5_scores"]])
    pred = pd.DataFrame({"image_id": stored["image_id"].astype(str), "prediction": stored["prediction"].astype("Int64"),
                         "confidence": conf})
    images = recs.merge(pred, on="image_id", how="left")
    images["split"] = images["split"].astype(str)
    return images[list(compare.IMAGE_COLUMNS)]


def layers_in_model_order(ctx: Context, names: list[str]) -> list[str]:
    """The store's layers ordered as the model's modules (unknown names last, by name)."""
    order = {n: i for i, (n, _) in enumerate(ctx.model.module.named_modules())}
    return sorted(names, key=lambda n: (order.get(n, len(order)), n))


def neuron_table(store: ActivationStore, layers: list[str], k: int) -> pd.DataFrame:
    """Per (layer, channel): the spatial max over every image and the top-``k`` image ids (by max),
    from the store's top-K table of each layer (the same lookup as ``store.topk`` per channel)."""
    frames = [store.top_images(layer, k, by="max").rename(columns={"value": "max"}).assign(layer=layer)
              for layer in layers]
    return pd.concat(frames, ignore_index=True)[["layer", "channel", "max", "top"]]


def pixel_embeddings(images: pd.DataFrame, size: int,
                     known: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """Thumbnails of every distinct image (the first file of each image id), reusing ``known`` ones.

    Returns (image ids, thumbnails, number computed now).
    """
    first = images.drop_duplicates("image_id")
    ids = first["image_id"].to_numpy(dtype=object)
    todo = [i for i, im in enumerate(ids) if im not in known]
    thumbs = np.empty((len(ids), size * size), np.uint8)
    for i, im in enumerate(ids):
        if im in known:
            thumbs[i] = known[im]
    if todo:
        thumbs[todo] = pixels.thumbnails(first["path"].to_numpy()[todo].tolist(), size)
    return ids, thumbs, len(todo)


def localization(explain_dir: Path) -> tuple[pd.DataFrame | None, str | None]:
    """Per-class localisation from the explain stage's artifacts table, or None and why not."""
    path = explain_dir / "artifacts.parquet"
    if not path.exists():
        return None, (f"no explain artifacts at {path}: run stage=[explain,audit] (or set audit.explain_dir to "
                      "an explain folder) to compare localisation per class")
    artifacts = pd.read_parquet(path)
    table = compare.localization_by_class(artifacts) if "box_iou" in artifacts else pd.DataFrame()
    if table.empty:
        return None, f"the explain artifacts at {path} have no localisation scores (no labelled images with boxes)"
    return table, None


# ------------------------------------------------------------------------------------ helpers ---

def _records(df: pd.DataFrame, limit: int | None = None) -> list[dict[str, Any]]:
    df = df if limit is None else df.head(limit)
    df = df.astype(object)
    return df.where(df.notna(), None).to_dict("records")


def check(cfg: Any) -> None:
    """The audit's own settings, checked before any stage of the run does work."""
    _config_checks(cfg.audit)


def _config_checks(acfg: Any) -> dict[str, float | None]:
    limits = dict(acfg.get("fail_on") or {})
    for key in limits:
        name = key.removeprefix("max_")
        if not key.startswith("max_") or name not in CHECKS:
            known = [f"max_{c}" for c in CHECKS]
            raise PipelineError(f"unknown audit.fail_on key '{key}'.{suggest(key, known)} Known: {', '.join(known)}.")
    return {k: None if v is None else float(v) for k, v in limits.items()}


def _timed(seconds: dict[str, float], name: str, start: float) -> float:
    now = time.perf_counter()
    seconds[name] = round(now - start, 3)
    return now


# ------------------------------------------------------------------------------------ sections ---

def localization_section(loc_now: pd.DataFrame | None, note: str | None,
                         base: snapshot.Snapshot | None) -> tuple[dict[str, Any], float | None]:
    """Localisation per method and class beside the baseline's; and the largest pointing-rate drop."""
    section: dict[str, Any] = {"note": note, "methods": [], "per_class": []}
    if loc_now is None:
        return section, None
    old = pd.DataFrame(base.manifest.get("localization") or []) if base is not None else None
    per_class, per_method = compare.localization_delta(loc_now, old)
    section.update(methods=_records(per_method), per_class=_records(per_class))
    drops = -per_method["pointing_delta"].dropna()
    return section, float(drops.max()) if len(drops) else None


def neuron_sections(store: ActivationStore, neurons: pd.DataFrame, base: snapshot.Snapshot | None,
                    eps: float, k: int, listed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The dead-neuron section (per layer: dead, newly dead, revived) and the top-k change section."""
    dead = compare.dead_neurons(neurons, eps)
    old_dead = compare.dead_neurons(base.neurons, eps) if base is not None else dead.iloc[0:0]
    old_layers = set(base.neurons["layer"]) if base is not None else set()
    by_layer, new_total = {}, 0
    for layer in dict.fromkeys(neurons["layer"]):
        now = set(dead.loc[dead["layer"] == layer, "channel"].tolist())
        was = set(old_dead.loc[old_dead["layer"] == layer, "channel"].tolist())
        compared = layer in old_layers
        by_layer[layer] = {"channels": store.channels(layer), "dead": sorted(now),
                           "new": sorted(now - was) if compared else [],
                           "revived": sorted(was - now) if compared else []}
        new_total += len(by_layer[layer]["new"])
    dead_section = {"eps": eps, "total": len(dead), "new": new_total if base is not None else None,
                    "by_layer": by_layer}
    changes = compare.topk_changes(neurons, base.neurons) if base is not None else None
    topk_section = {"k": k, "compared": 0, "mean_by_layer": {}, "most_changed": []}
    if changes is not None:
        topk_section.update(compared=len(changes), most_changed=_records(changes, listed), mean_by_layer={
            str(lay): float(v) for lay, v in changes.groupby("layer")["jaccard_distance"].mean().items()})
    return dead_section, topk_section


def unit_label_section(store: ActivationStore, layers: list[str], base: snapshot.Snapshot | None,
                       listed: int) -> tuple[dict[str, Any], pd.DataFrame | None]:
    """The dissected units' labels now (layers stage=dissect has labelled) against the baseline's:
    changed labels and lost concepts; and the table to snapshot (None when nothing is dissected)."""
    frames = []
    for layer in layers:
        labels = read_unit_labels(store, layer)
        if labels is not None:
            frames.append(labels[["unit", "label", "concept", "iou"]].assign(layer=layer))
    now = pd.concat(frames, ignore_index=True) if frames else None
    old = base.unit_labels() if base is not None else None
    section: dict[str, Any] = {"dissected": [] if now is None else sorted(set(now["layer"])), "compared": False}
    if now is not None and old is not None:
        section.update(compare.unit_label_changes(now, old, listed), compared=True)
    return section, now


def outlier_section(store: ActivationStore, layer: str, images: pd.DataFrame, k: int,
                    listed: int) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """k-NN outliers in ``layer``'s pooled vectors; also returns the image ids and centred vectors
    of the images still in the dataset (for feature-level duplicate search)."""
    rows, vectors, source = store.mean_vectors(layer)  # raw vectors: the audit centres them itself
    stored = store.images()
    image_of_row = pd.Series(stored["image_id"].astype(str).to_numpy(), index=stored["row_id"].to_numpy())
    ids = image_of_row.reindex(rows).to_numpy(dtype=object)
    first = images.drop_duplicates("image_id").set_index("image_id")
    live = pd.Index(ids).isin(first.index)
    ids, vectors = ids[live], vectors[live]
    # Pooled post-ReLU vectors share one large common direction (every image's nearest neighbour
    # has cosine > 0.998 on the digits CNN); centring on the dataset mean makes cosine discriminate.
    centred = vectors - vectors.mean(axis=0, keepdims=True) if len(vectors) else vectors
    scores = compare.knn_outlier_scores(centred, k)
    table = first.loc[ids, ["path", "split", "label", "prediction"]].reset_index()
    table["score"] = scores
    table = table.sort_values(["score", "path"], ascending=[False, True]).reset_index(drop=True)
    section = {"layer": layer, "k": k, "source": source, "images": len(ids),
               "distance": "cosine, vectors centred on the dataset mean",
               "median": float(np.median(scores)) if len(scores) else None,
               "p99": float(np.quantile(scores, 0.99)) if len(scores) else None,
               "list": _records(table, listed)}
    return section, ids, centred


def duplicate_section(images: pd.DataFrame, dcfg: Any, base: snapshot.Snapshot | None, layer: str,
                      feature_ids: np.ndarray, features: np.ndarray,
                      listed: int) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray, int] | None]:
    """Exact and near-duplicate file pairs, across splits first; and the thumbnails to snapshot."""
    embedding = str(dcfg.embedding)
    thumbs = None
    if embedding == "pixels":
        size = int(dcfg.thumb)
        ids, pixels_, computed = pixel_embeddings(images, size, base.thumbs(size) if base is not None else {})
        thumbs = (ids, pixels_, size)
        emb = pixels.embed(pixels_)
        section: dict[str, Any] = {"embedding": "pixels", "thumb": size, "thumbnails_computed": computed}
    else:
        ids, emb = feature_ids, features
        section = {"embedding": f"features ({layer}, centred)"}
    near = compare.similar_pairs(emb, float(dcfg.threshold), int(dcfg.k))
    pairs = compare.duplicate_pairs(images, ids, near)
    across = pairs[pairs["across_splits"]]
    section.update({"threshold": float(dcfg.threshold), "k": int(dcfg.k), "pairs_total": len(pairs),
                    "across_splits": len(across), "exact_across_splits": int((across["kind"] == "exact").sum()),
                    "near_across_splits": int((across["kind"] == "near").sum()),
                    "within_split": int(len(pairs) - len(across)), "pairs": _records(pairs, listed)})
    return section, thumbs


def label_noise_section(images: pd.DataFrame, base: snapshot.Snapshot | None, min_conf: float,
                        listed: int) -> dict[str, Any]:
    """Labels that disagree with a confident prediction; ``new``: not flagged in the baseline."""
    noisy = compare.label_noise(images, min_conf)
    new = None
    if base is not None:
        was = compare.label_noise(base.images, min_conf)
        keys = pd.MultiIndex.from_frame(noisy[["path", "image_id"]])
        new = int((~keys.isin(pd.MultiIndex.from_frame(was[["path", "image_id"]]))).sum()) if len(noisy) else 0
    return {"min_confidence": min_conf, "count": len(noisy), "new": new, "list": _records(noisy, listed)}


def reliance_section(ctx: Context, acfg: Any, base: snapshot.Snapshot | None, out_dir: Path,
                     listed: int) -> tuple[dict[str, Any], dict[str, float | None], pd.DataFrame | None]:
    """Is the model looking at the object, per class, on every image of ``audit.reliance.split``:
    maps and scores from the map store (computing what no run or shard has stored), flags, the
    in-object energy against the baseline and each image's map against the baseline's (drift).
    Returns the section, its check values and the thumbs to snapshot."""
    rcfg = acfg.reliance
    if not bool(rcfg.enabled):
        return {"note": "audit.reliance.enabled is false"}, {}, None
    ecfg = ctx.cfg.explain.copy()
    ecfg.methods = list(rcfg.methods)
    names = method_names(ecfg)
    scores, explainer, split = explain_split(ctx, ecfg, names, rcfg.split)
    rules = reliance_rules(ecfg.reliance)
    section = assess(scores, explainer.stores, ctx.model.class_names, rules, int(ctx.cfg.seed),
                     out_dir / "reliance", ctx.model, str(ecfg.overlay.cmap), float(ecfg.overlay.alpha))
    section.update(split=str(rcfg.split), maps_computed=int((~scores["cached"]).sum()),
                   object_problems=explainer.problems[:listed], energy_drops=[], drift=[])
    if bool(ecfg.causal.enabled):
        causal, _ = causal_section(ctx, ecfg.causal, rules, split.items, split.predicted, split.keep, split.per_call,
                                   out_dir / "reliance")
        section["causal"] = causal.pop("rows")
        section["causal_check"] = causal
        section["flagged_classes"] = list(dict.fromkeys([*section["flagged_classes"], *causal["flagged_classes"]]))
    thumbs = thumbs_table(scores, explainer.stores)
    values: dict[str, float | None] = {"flagged_classes": float(len(section["flagged_classes"])),
                                       "inside_energy_drop": None, "object_only_drop": None}
    if base is not None:
        old = pd.DataFrame((base.manifest.get("reliance") or {}).get("per_class") or [])
        now = pd.DataFrame(section["per_class"])
        if not old.empty and not now.empty:
            both = now.merge(old[["class_name", "method", "inside_energy"]], on=["class_name", "method"],
                             suffixes=("", "_baseline"))
            both["inside_energy_delta"] = both["inside_energy"] - both["inside_energy_baseline"]
            drops = -both["inside_energy_delta"].dropna()
            values["inside_energy_drop"] = float(drops.max()) if len(drops) else None
            limit = _config_checks(acfg).get("max_inside_energy_drop")
            worse = both[-both["inside_energy_delta"] > (limit if limit is not None else 0.0)]
            section["energy_drops"] = _records(worse.sort_values("inside_energy_delta")[
                ["class_name", "method", "inside_energy_baseline", "inside_energy", "inside_energy_delta"]], listed)
        old_causal = pd.DataFrame((base.manifest.get("reliance") or {}).get("causal") or [])
        now_causal = pd.DataFrame(section.get("causal") or [])
        if not old_causal.empty and not now_causal.empty:
            both = now_causal.merge(old_causal[["class_name", "object_only_retention"]], on="class_name",
                                    suffixes=("", "_baseline"))
            both["object_only_delta"] = both["object_only_retention"] - both["object_only_retention_baseline"]
            drops = -both["object_only_delta"].dropna()
            values["object_only_drop"] = float(drops.max()) if len(drops) else None
            limit = _config_checks(acfg).get("max_object_only_drop")
            worse = both[-both["object_only_delta"] > (limit if limit is not None else 0.0)]
            section["causal_check"]["object_only_drops"] = _records(worse[
                ["class_name", "object_only_retention_baseline", "object_only_retention", "object_only_delta"]], listed)
        then = base.reliance_maps()
        if then is not None:
            section["drift"] = _records(drift(thumbs, then, ctx.model.class_names))
    return section, values, thumbs


# -------------------------------------------------------------------------------------- stage ---

def run(ctx: Context) -> dict[str, Any]:
    """Audit the run's dataset, store and explanations against the baseline snapshot."""
    acfg = ctx.cfg.audit
    limits = _config_checks(acfg)
    if str(acfg.duplicates.embedding) not in EMBEDDINGS:
        raise PipelineError(f"unknown audit.duplicates.embedding '{acfg.duplicates.embedding}': "
                            f"use {' or '.join(EMBEDDINGS)}.")
    listed = int(acfg.list_limit)
    root = Path(str(acfg.snapshots))
    seconds: dict[str, float] = {}
    t = start = time.perf_counter()

    store = ctx.store()
    if not store.layers() or store.images().empty:
        raise PipelineError(f"the activation store at {store.root} holds no images yet: run stage=extract before "
                            "stage=audit.")
    layers = layers_in_model_order(ctx, store.layers())
    layer = str(acfg.layer) if acfg.get("layer") else layers[-1]
    if layer not in layers:
        raise PipelineError(f"audit.layer={layer} is not in the activation store.{suggest(layer, layers)} "
                            f"Stored layers: {', '.join(layers)}.")
    images = current_images(ctx, store)
    base_path = snapshot.resolve(acfg.baseline, root)
    base = snapshot.load(base_path) if base_path else None
    notes: list[str] = []
    if base is None:
        notes.append("no baseline snapshot: this is the first audit of the series"
                     if str(acfg.baseline) == "latest" else "audit.baseline is null: nothing compared")
    elif base.manifest.get("model_key") != ctx.model.key:
        notes.append("the model changed since the baseline: flips and top-k changes compare different models")
    not_extracted = int(images["prediction"].isna().sum())
    if not_extracted:
        notes.append(f"{not_extracted} files are not in the activation store and have no prediction: "
                     "run stage=extract before stage=audit")
    report: dict[str, Any] = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_dir": str(ctx.run_dir),
                              "baseline": None, "notes": notes}
    if base is not None:
        report["baseline"] = {"path": str(base.path), "name": base.manifest.get("name"),
                              "created": base.manifest.get("created"),
                              "same_model": base.manifest.get("model_key") == ctx.model.key}
    t = _timed(seconds, "load", t)

    im: dict[str, Any] = {"files": len(images), "unique": int(images["image_id"].nunique()),
                          "not_extracted": not_extracted,
                          "by_split": {str(k): int(v) for k, v in images["split"].value_counts().sort_index().items()}}
    if base is not None:
        im.update(compare.image_changes(images, base.images, listed))
    report["images"] = im
    acc_now = compare.accuracy(images)
    report["accuracy"] = compare.accuracy_delta(acc_now, base.manifest.get("accuracy") if base else None)
    flips, compared = (compare.prediction_flips(images, base.images) if base is not None
                       else (pd.DataFrame(columns=["image_id", "path", "label", "old_prediction", "prediction"]), 0))
    report["flips"] = {"count": len(flips), "compared": compared,
                       "fraction": len(flips) / compared if compared else None, "list": _records(flips, listed)}
    t = _timed(seconds, "images", t)

    explain_dir = Path(str(acfg.explain_dir)) if acfg.get("explain_dir") else ctx.run_dir / "explain"
    loc_now, loc_note = localization(explain_dir)
    report["localization"], pointing_drop = localization_section(loc_now, loc_note, base)
    t = _timed(seconds, "localization", t)

    k = max(1, min(int(acfg.top_k), store.top_k))
    neurons = neuron_table(store, layers, k)
    report["dead_neurons"], report["topk_changes"] = neuron_sections(store, neurons, base, float(acfg.dead_eps), k,
                                                                     int(acfg.top_k_report))
    t = _timed(seconds, "neurons", t)

    report["unit_labels"], units = unit_label_section(store, layers, base, listed)
    report["outliers"], feature_ids, features = outlier_section(store, layer, images, int(acfg.outliers.k),
                                                                int(acfg.outliers.count))
    t = _timed(seconds, "outliers", t)
    report["duplicates"], thumbs = duplicate_section(images, acfg.duplicates, base, layer, feature_ids, features,
                                                     listed)
    t = _timed(seconds, "duplicates", t)
    report["label_noise"] = label_noise_section(images, base, float(acfg.label_noise.min_confidence), listed)
    t = _timed(seconds, "label_noise", t)
    out_dir = ctx.run_dir / "audit"
    report["reliance"], reliance_values, reliance_thumbs = reliance_section(ctx, acfg, base, out_dir, listed)
    t = _timed(seconds, "reliance", t)

    values = {"accuracy_drop": -report["accuracy"]["delta"] if report["accuracy"]["delta"] is not None else None,
              "flip_fraction": report["flips"]["fraction"],
              "duplicates_across_splits": report["duplicates"]["across_splits"],
              "new_dead_neurons": report["dead_neurons"]["new"],
              "label_noise": report["label_noise"]["count"], "pointing_drop": pointing_drop, **reliance_values}
    checks = compare.evaluate(values, limits)
    regressions = [CHECKS[c["check"]].format(v=c["value"], l=c["limit"]) for c in checks if c["failed"]]
    enforce = bool(acfg.enforce)
    report.update(checks=checks, regressions=regressions, passed=not regressions, enforced=enforce, snapshot=None)
    if bool(acfg.save):
        manifest = {"created": report["created"], "run_dir": str(ctx.run_dir), "model_key": ctx.model.key,
                    "dataset": {"name": ctx.dataset.name, "key": ctx.dataset.key},
                    "store_generation": store.generation, "layers": layers, "topk": k, "accuracy": acc_now,
                    "localization": _records(loc_now) if loc_now is not None else [],
                    "reliance": {"per_class": report["reliance"].get("per_class", []),
                                 "causal": report["reliance"].get("causal") or []},
                    "regressions": regressions, "accepted": not regressions or not enforce}
        report["snapshot"] = str(snapshot.save(root, manifest, images, neurons, thumbs, reliance_thumbs, units))
    _timed(seconds, "checks_and_snapshot", t)
    seconds["total"] = round(time.perf_counter() - start, 3)
    report["seconds"] = seconds

    atomic_write_json(out_dir / "audit.json", report)
    atomic_write_bytes(out_dir / "section.html", render_section(report, ctx.model.class_names).encode())
    result = {"passed": not regressions, "regressions": len(regressions),
              "baseline": report["baseline"]["name"] if base is not None else None,
              "added": im.get("added"), "removed": im.get("removed"), "changed": im.get("changed"),
              "relabelled": im.get("relabelled"), "flips": len(flips),
              "accuracy": round(acc_now["accuracy"], 4) if acc_now["accuracy"] is not None else None,
              "dead_neurons": report["dead_neurons"]["total"],
              "duplicates_across_splits": report["duplicates"]["across_splits"],
              "label_noise": report["label_noise"]["count"], "report": str(out_dir / "audit.json"),
              "units_relabelled": report["unit_labels"].get("changed"),
              "units_lost_concept": report["unit_labels"].get("lost"),
              "flagged_classes": report["reliance"].get("flagged_classes"),
              "snapshot": report["snapshot"]}
    if regressions and enforce:
        raise AuditFailed(f"audit failed: {'; '.join(regressions)}. Details: {out_dir / 'audit.json'}", result)
    return result
