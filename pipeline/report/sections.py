"""The report's sections, each rendered from plain data (tables, dicts) into a :class:`Section`.

Pictures are placed through :class:`~pipeline.report.assets.Assets`; a missing file shows as a
small 'missing' box instead of a broken image. A section whose stage did not run says so.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.report.assets import Assets
from pipeline.report.data import Overview, SanityResult, StoreNeuron
from pipeline.report.html import (Raw, Section, badge, esc, facts, figure, fmt, img, link, note, sparkline,
                                  table)

QUARANTINE_SHOWN = 200
STAGE_FIELDS_SHOWN = 8


def _short(value: Any, width: int = 60) -> str:
    text = fmt(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _details(summary: str, body: str) -> Raw:
    return Raw(f"<details><summary>{esc(summary)}</summary>{body}</details>")


# ------------------------------------------------------------------------------ overview ---

def overview_section(ov: Overview | None, why_missing: str = "") -> Section:
    """Dataset and model facts, accuracy per split and per class, quarantined files, the stages run."""
    if ov is None:
        return Section("overview", "Dataset and model", note(why_missing or "No dataset or model was loaded."))
    parts: list[str] = []
    d, m = ov.dataset, ov.model
    training = m.get("training") or {}
    parts.append(facts({
        "dataset": d.get("name"), "images": d.get("images"), "quarantined files": d.get("quarantined"),
        "model": m.get("name"), "classes": m.get("classes"),
        **({"training test accuracy": training["test_accuracy"]} if "test_accuracy" in training else {}),
        "model key": str(m.get("key", ""))[:16]}))
    if ov.splits is not None:
        parts.append("<h3>Accuracy (activation store)</h3>")
        parts.append(table(["split", "images", "labelled", "correct", "accuracy"],
                           ov.splits[["split", "images", "labelled", "correct", "accuracy"]].itertuples(index=False)))
        if ov.per_class is not None and len(ov.per_class):
            rows = ov.per_class[["class", "name", "images", "accuracy"]].itertuples(index=False)
            parts.append(_details(f"Accuracy per class ({len(ov.per_class)} classes)",
                                  table(["class", "name", "labelled images", "accuracy"], rows)))
    else:
        parts.append(note(ov.accuracy_note or "No accuracy: the activation store has no predictions."))
    parts.append("<h3>Quarantined files</h3>")
    if ov.quarantine is None:
        parts.append(note("No quarantine list: the dataset was not loaded in this run."))
    elif ov.quarantine.empty:
        parts.append(note("No file was quarantined: every image was readable."))
    else:
        q = ov.quarantine
        shown = q.head(QUARANTINE_SHOWN)
        more = f" (first {QUARANTINE_SHOWN} shown; all in quarantine.csv)" if len(q) > QUARANTINE_SHOWN else ""
        parts.append(note(f"{len(q)} file(s) skipped as unreadable or unsafe{more}."))
        parts.append(table(["file", "reason"], ((r.path, r.reason) for r in shown.itertuples(index=False))))
    if ov.stages:
        parts.append("<h3>Stages in this run</h3>")
        rows = []
        for name, result in ov.stages.items():
            shown_fields = [(k, v) for k, v in result.items() if not isinstance(v, (dict, list)) and k != "seconds"]
            text = ", ".join(f"{k}={_short(v, 40)}" for k, v in shown_fields[:STAGE_FIELDS_SHOWN])
            rows.append((name, result.get("seconds"), text))
        parts.append(table(["stage", "seconds", "result"], rows))
    return Section("overview", "Dataset and model", Raw("".join(parts)))


# ------------------------------------------------------------------------------- neurons ---

def _vis_rows(vis: pd.DataFrame | None, kind: str) -> pd.DataFrame:
    if vis is None or vis.empty or "kind" not in vis:
        return pd.DataFrame(columns=["kind", "layer", "channel"])
    return vis[vis["kind"] == kind]


PROJECTION_KINDS = {"deconv": "deconvnet", "guided": "guided_backprop"}
PROJECTION_NOTE = ("Projections map a channel's strongest unit back to the image. The deconvnet (Zeiler & Fergus) "
                   "reads the image only through max-pooling's switches: without max-pool layers it draws the same "
                   "pattern for every image, its filters spread on the layer's stride grid (a checkerboard). Guided "
                   "backprop (Springenberg et al.) is also gated by the forward pass's ReLUs, so it depends on the "
                   "image. Input dependence: the mean Spearman between the projections of a channel's different top "
                   "images, aligned on the unit; near 1, the picture shows the network, not the image.")


def neurons_section(neurons: Sequence[StoreNeuron] | None, store_note: str, vis: pd.DataFrame | None,
                    projections: dict[str, Any] | None, assets: Assets, browser: str | None = None) -> Section:
    """A link to the model browser (``browser``, a relative URL) when there is one; per layer and
    neuron: its top images and their receptive-field crops (activation store), its gradient-ascent
    picture and projections (visualize stage) with their input dependence; then the class pictures."""
    neurons = list(neurons or [])
    ascent, classes = _vis_rows(vis, "ascent"), _vis_rows(vis, "class")
    projected = {kind: _vis_rows(vis, kind) for kind in PROJECTION_KINDS}
    methods = (projections or {}).get("methods", {})
    order: dict[tuple[str, int], StoreNeuron | None] = {(n.layer, n.channel): n for n in neurons}
    for frame in (ascent, *projected.values()):
        for layer, channel in zip(frame["layer"], frame["channel"]):
            order.setdefault((str(layer), int(channel)), None)
    parts: list[str] = []
    if browser is not None:
        parts.append(f'<p class="browser">{link(browser, "Model browser")}: every unit of every layer, with '
                     "its top images, feature visualisation, projections and concept label.</p>")
    if not neurons:
        parts.append(note(store_note or "No activation store: run stage=extract for top images and crops."))
    if vis is None:
        parts.append(note("No gradient-ascent pictures or projections: stage=visualize did not run in this run."))
    if methods:
        parts.append(projection_summary(projections or {}))
    layers = list(dict.fromkeys(layer for layer, _ in order))
    for layer in layers:
        parts.append(f"<h3>Layer {esc(layer)}</h3>")
        for (lay, channel), neuron in order.items():
            if lay != layer:
                continue
            parts.append(_neuron_block(layer, channel, neuron, ascent, projected, methods, assets))
    if len(classes):
        parts.append("<h3>Class visualisations (gradient ascent)</h3>")
        figs = []
        for r in classes.itertuples(index=False):
            cap = f"{r.class_name} (p={fmt(float(r.value), 2)})"
            figs.append(figure(img(assets.image(r.png, "visualize"), f"class {r.class_name}"), cap))
        parts.append(f'<div class="row">{"".join(figs)}</div>')
    if vis is not None and vis.empty:
        parts.append(note("stage=visualize wrote no pictures."))
    return Section("neurons", "Neurons", Raw("".join(parts)))


def projection_summary(projections: dict[str, Any]) -> str:
    """What the projections draw, and per method its input dependence, verdict and notes."""
    rows = []
    for m in projections["methods"].values():
        verdict = badge(None if m["input_dependence"] is None or pd.isna(m["input_dependence"]) else not m["flagged"],
                        yes="depends on the image", no="image-independent")
        rows.append([m["title"], m["input_dependence"], verdict, m["grid_dominated"], m["projections"],
                     "; ".join(t for t in (m["reason"], m["grid_note"]) if t)])
    limit = next(iter(projections["methods"].values()))["max_spearman"]
    why = projections.get("note", "")
    return "".join([note(PROJECTION_NOTE + f" Flagged above {limit}."),
                    note(f"Projections drawn: {why}.") if why and why != "configured" else "",
                    table(["projection", "input Spearman", "input dependence", "on the stride grid", "pictures",
                           "note"], rows)])


def _neuron_block(layer: str, channel: int, neuron: StoreNeuron | None, ascent: pd.DataFrame,
                  projected: dict[str, pd.DataFrame], methods: dict[str, Any], assets: Assets) -> str:
    out = [f'<div class="neuron"><div class="label">{esc(layer)} : channel {channel}</div>']
    if neuron is not None:
        tops = [figure(img(assets.image(p, "inputs"), Path(p).name, title=p), cap, "small")
                for p, cap in zip(neuron.paths, neuron.captions)]
        out.append(f'<h4>top {len(tops)} images (by spatial max)</h4><div class="row">{"".join(tops)}</div>')
        if neuron.crops:
            crops = [figure(img(assets.image(c, "crops"), f"crop {i + 1}"), "", "small")
                     for i, c in enumerate(neuron.crops)]
            out.append(f'<h4>receptive-field crops around the strongest unit</h4><div class="row">{"".join(crops)}</div>')
    a = ascent[(ascent["layer"] == layer) & (ascent["channel"] == channel)]
    if len(a):
        figs = [figure(img(assets.image(r.png, "visualize"), "gradient ascent"), "gradient ascent")
                for r in a.itertuples(index=False)]
        out.append(f'<h4>gradient ascent</h4><div class="row">{"".join(figs)}</div>')
    for kind, method in PROJECTION_KINDS.items():
        d = projected[kind]
        d = d[(d["layer"] == layer) & (d["channel"] == channel)]
        if not len(d):
            continue
        title = methods.get(method, {}).get("title", method.replace("_", " "))
        score = methods.get(method, {}).get("per_channel", {}).get(str(channel))
        flagged = score is not None and not pd.isna(score) and score > methods[method]["max_spearman"]
        heading = f"{esc(title)} projections | patches"
        if score is not None and not pd.isna(score):
            heading += f" · input Spearman {fmt(float(score), 2)} {badge(not flagged, 'depends on the image', 'image-independent')}"
        figs = []
        for r in (d.sort_values("rank") if "rank" in d else d).itertuples(index=False):
            pair = img(assets.image(r.png, "visualize"), f"{title} projection")
            patch = img(assets.image(getattr(r, "patch_png", None), "visualize"), "image patch")
            rank = "" if pd.isna(getattr(r, "rank", None)) else f"#{int(r.rank) + 1} "
            figs.append(figure(Raw(pair + patch), f"{rank}{title} | patch", "small"))
        out.append(f'<h4>{heading}</h4><div class="row">{"".join(figs)}</div>')
    out.append("</div>")
    return "".join(out)


# -------------------------------------------------------------------------- explanations ---

def _score_text(row: Any) -> str:
    bits = []
    iou = getattr(row, "box_iou", float("nan"))
    if iou is not None and not pd.isna(iou):
        bits.append(f"IoU {float(iou):.2f}")
    hit = getattr(row, "pointing_hit", float("nan"))
    if hit is not None and not pd.isna(hit):
        bits.append("point ✓" if float(hit) >= 0.5 else "point ✗")
    return " · ".join(bits)


def explanations_section(rows: pd.DataFrame | None, assets: Assets, limit: int | None = None) -> Section:
    """For each explained image: the input, every method's overlay, the prediction, links to the raw
    map.npy / meta.json of each method and to the image's panel."""
    if rows is None:
        return Section("explanations", "Explanations", note("No explanations: stage=explain did not run in this run."))
    if rows.empty:
        return Section("explanations", "Explanations", note("stage=explain explained no images."))
    maps = rows[rows["overlay_path"].notna()] if "overlay_path" in rows else rows.iloc[0:0]
    by_image: dict[str, list[Any]] = {}
    for r in maps.itertuples(index=False):
        by_image.setdefault(str(r.image_id), []).append(r)
    ids = list(dict.fromkeys(rows["image_id"].astype(str)))
    shown = ids if limit is None else ids[:limit]
    first = {str(r["image_id"]): r for r in rows.drop_duplicates("image_id").to_dict("records")}
    methods = list(dict.fromkeys(maps["method"].astype(str)))
    parts = [note(f"{len(ids)} image(s) x {len(methods)} method(s): {', '.join(methods)}."
                  + (f" The first {len(shown)} are shown." if len(shown) < len(ids) else "")
                  + " Colour shows evidence for the target class (negative values are not drawn).")]
    for image_id in shown:
        r0 = first[image_id]
        name = Path(str(r0["path"])).name
        label = r0.get("label_name")
        label = "–" if label is None or (isinstance(label, float) and math.isnan(label)) else label
        pred = f"{r0.get('prediction_name')} ({fmt(float(r0.get('score', float('nan'))), 2)})"
        meta = (f'<div class="meta"><b>{esc(name)}</b> label: <b>{esc(label)}</b> prediction: <b>{esc(pred)}</b> '
                f"target: <b>{esc(r0.get('target_name'))}</b> "
                f'<span class="note">{esc(r0.get("split", ""))} · {esc(r0.get("selected_by", ""))} · '
                f"{esc(image_id[:12])}</span></div>")
        figs = [figure(img(assets.image(r0["path"], "inputs"), name, title=str(r0["path"])), "input")]
        for r in by_image.get(image_id, []):
            links = [link(assets.file(r.map_path, "raw", ".map.npy"), "map.npy")]
            if getattr(r, "artifact_dir", None):
                links.append(link(assets.file(os.path.join(r.artifact_dir, "meta.json"), "raw", ".meta.json"),
                                  "meta.json"))
            score = _score_text(r)
            caption = Raw(f"{esc(r.method)}" + (f"<br>{esc(score)}" if score else "")
                          + f'<br><span class="links">{" ".join(links)}</span>')
            figs.append(figure(img(assets.file(r.overlay_path, "overlays"), f"{r.method} overlay"), caption))
        panel = r0.get("panel_path")
        panel_link = (f'<div class="links">{link(assets.file(panel, "panels"), "side-by-side panel")}</div>'
                      if isinstance(panel, str) and panel else "")
        parts.append(f'<div class="explained">{meta}<div class="row">{"".join(figs)}</div>{panel_link}</div>')
    return Section("explanations", "Explanations", Raw("".join(parts)))


# ------------------------------------------------------------------------------- metrics ---

METRIC_COLUMNS = (("images", "images"), ("pointing", "pointing game ↑"), ("box_accuracy", "box accuracy ↑"),
                  ("mean_iou", "mean IoU ↑"), ("deletion_auc", "deletion AUC ↓"),
                  ("insertion_auc", "insertion AUC ↑"))


def _count(value: Any) -> Any:
    """A count stored as a float (JSON) shown as an integer."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def metrics_section(metrics: dict[str, Any] | None) -> Section:
    """The explanation-quality table per method (on images with ground-truth boxes)."""
    if metrics is None:
        return Section("metrics", "Explanation quality",
                       note("No explanation metrics: stage=explain did not run in this run."))
    per_method = metrics.get("methods") or {}
    if not per_method:
        return Section("metrics", "Explanation quality",
                       note("No explanation metrics: no explained image has a ground-truth box "
                            "(or explain.metrics.enabled=false)."))
    params = metrics.get("params") or {}
    parts = [note(f"Per method, over the explained images with ground-truth boxes (target: {metrics.get('target')}). "
                  f"Box: largest region ≥ {params.get('box_threshold', '?')} of the map's max, a hit at IoU ≥ "
                  f"{params.get('iou', '?')}. Deletion/insertion: area under the class-probability curve as "
                  "the most salient pixels are removed/added.")]
    rows = [[m, *[_count(v.get(k)) if k == "images" else v.get(k) for k, _ in METRIC_COLUMNS]]
            for m, v in per_method.items()]
    parts.append(table(["method", *[label for _, label in METRIC_COLUMNS]], rows))
    extra = {}
    for method, engine in (metrics.get("engines") or {}).items():
        extra[f"{method} engine"] = ", ".join(map(str, engine.get("used", [])))
    for method, conv in (metrics.get("conversions") or {}).items():
        extra[f"{method} localizer layer"] = conv.get("layer")
        extra[f"{method} localizer accuracy"] = conv.get("converted_accuracy")
        extra["original accuracy"] = conv.get("original_accuracy")
    if extra:
        parts.append(facts(extra))
    return Section("metrics", "Explanation quality", Raw("".join(parts)))


# -------------------------------------------------------------------------------- sanity ---

def sanity_section(results: Sequence[SanityResult] | None, why_missing: str, max_final: float,
                   max_class: float, max_input: float, assets: Assets) -> Section:
    """One row per method: the cascading randomisation curve, the class check, the input check, and
    pass or FAIL."""
    title = "Sanity checks"
    if not results:
        return Section("sanity", title, note(why_missing or "No sanity checks were run."))
    parts = [note("Adebayo et al. 2018. Model randomisation: the layers are re-initialised one by one from "
                  "the output side (cascading); the curve is the mean Spearman rank correlation between the "
                  f"trained and the randomised model's maps after each step. It passes when the final value is "
                  f"≤ {max_final}. Class check: the mean Spearman between the maps for the predicted and the "
                  f"second most likely class; it passes when ≤ {max_class}. Input check (Kindermans et al. "
                  "2017): the mean Spearman between the maps of different images for the same class (the first "
                  f"image's predicted class); it passes when ≤ {max_input}. A method that fails a check does not "
                  "depend enough on what the model learned, on the class, or on the image to be trusted.")]
    rows = []
    for r in results:
        curve = (sparkline([1.0, *r.steps], ["trained", *[f"after {layer}" for layer in r.layers]],
                           threshold=max_final) if r.steps else "")
        strip = (figure(img(assets.image(r.strip, "sanity"), f"{r.method} cascade"),
                        "maps of the first image: trained, then after randomising " + ", ".join(r.layers), "wide")
                 if r.strip else Raw(""))
        verdict = badge(None if r.status == "n/a" else r.status == "pass")
        rows.append([Raw(f"<b>{esc(r.method)}</b>"), verdict, r.images,
                     r.final_spearman, badge(r.randomization_ok), Raw(curve + strip),
                     r.class_spearman, r.class_rel_l2, badge(r.class_ok), r.input_spearman, badge(r.input_ok),
                     r.reason])
    parts.append(Raw('<div class="scroll">') + table(
        ["method", "verdict", "images", "final Spearman", "randomisation", "Spearman after each step / maps",
         "class Spearman", "class rel. L2", "class check", "input Spearman", "input check", "note"], rows)
                 + Raw("</div>"))
    return Section("sanity", title, Raw("".join(parts)))


# --------------------------------------------------------------------------------- audit ---

RELIANCE_COLUMNS = ("class_name", "method", "images", "with_object", "inside_energy", "pointing", "outside_fraction",
                    "clusters", "flagged")


def reliance_section(rel: dict[str, Any] | None, origin: str, assets: Assets) -> Section:
    """Is the model looking at the object? Per class and method, the flag rule, and per flagged
    class its worst images and where its attribution sits outside the object."""
    title = "Reliance: is the model looking at the object?"
    if rel is None:
        return Section("reliance", title, note("No whole-split reliance: run stage=explain explain.select.all=true, "
                                               "or stage=audit (its reliance section)."))
    rows = rel.get("per_class") or []
    parts = [facts({"images": rel.get("images"), "methods": ", ".join(rel.get("methods") or []), "from": origin,
                    "flagged classes": ", ".join(map(str, rel.get("flagged_classes") or [])) or "none"}),
             note(rel.get("rule", ""))]
    if not rows:
        parts.append(note("No class could be scored."))
    else:
        shown = [[", ".join(map(str, r[c])) if isinstance(r.get(c), list) else
                  ("yes" if r.get(c) else "") if c == "flagged" else r.get(c) for c in RELIANCE_COLUMNS]
                 for r in rows]
        parts.append(table([c.replace("_", " ") for c in RELIANCE_COLUMNS], shown, cls="reliance"))
    for r in rows:
        if not r.get("flagged"):
            continue
        parts.append(f"<h3>Class {esc(r['class_name'])}, {esc(r['method'])}</h3>")
        parts.append(note(r.get("reason", "")))
        figs = r.get("figures") or {}
        pictures = [figure(img(assets.file(figs[k], "reliance"), f"{r['class_name']} {k}"), caption)
                    for k, caption in (("worst", "the images looking least at the object (object outlined in green)"),
                                       ("outside_mean", "where the attribution sits outside the object (class mean)"))
                    if figs.get(k)]
        parts.extend(pictures)
    causal = rel.get("causal_check")
    if causal is not None:
        parts.append("<h3>Causal check: predictions on the object alone and the context alone</h3>")
        parts.append(note(f"fill: {causal.get('fill')}. {causal.get('fill_why', '')}"))
        if not rel.get("causal"):
            parts.append(note(causal.get("note", "No causal rows.")))
        else:
            cols = ("class_name", "images", "accuracy", "object_only_retention", "context_only_retention",
                    "mixed_same", "mixed_rand", "bg_gap", "flagged")
            parts.append(table([c.replace("_", " ") for c in cols],
                               [[("yes" if r.get(c) else "") if c == "flagged" else r.get(c) for c in cols]
                                for r in rel["causal"]], cls="reliance"))
            others = [figure(img(assets.file(r["figure"], "reliance"), f"{r['class_name']} variants"),
                             f"class {r['class_name']}") for r in rel["causal"] if r.get("figure") and not r.get("flagged")]
            if others:
                parts.append(_details(f"Variants of the other {len(others)} classes", "".join(others)))
            for r in rel["causal"]:
                if r.get("flagged"):
                    parts.append(note(f"class {r['class_name']}: {r.get('reason', '')}"))
                    if r.get("figure"):
                        parts.append(figure(img(assets.file(r["figure"], "reliance"), f"{r['class_name']} variants"),
                                            "the class's images and their variants, titled with the prediction"))
    if rel.get("object_problems"):
        probs = rel["object_problems"]
        parts.append(_details(f"{len(probs)} images scored without their box or mask",
                              table(["file", "problem"], [[Path(p["path"]).name, p["problem"]] for p in probs])))
    return Section("reliance", title, Raw("".join(parts)))


def audit_section(fragment: str | None, audit: dict[str, Any] | None) -> Section:
    """stage=audit's own HTML fragment, or the top-level facts of audit.json, or a note."""
    if fragment is not None:
        return Section("audit", "Audit", Raw(fragment))
    if audit is not None:
        shown = {k: v for k, v in audit.items() if not isinstance(v, (dict, list))}
        return Section("audit", "Audit", facts(shown) if shown else note("audit.json has no summary values."))
    return Section("audit", "Audit", note("No audit: stage=audit did not run in this run."))
