"""The audit's HTML section: one ``<div class="audit">`` fragment for the run's report page.

The report puts it under its own "Audit" heading (``<section id="audit"><h2>``), so the fragment
has no id and starts at ``<h3>``. Plain tables, no scripts, styles or external resources; every
user-supplied string (paths, class names, layer names) is escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _fmt(v: Any) -> str:
    """A table cell: floats to 3 significant digits, None/NaN as a dash, all escaped."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "&ndash;"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}"
    return html.escape(str(v))


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]], empty: str = "none") -> str:
    """An HTML table of ``rows`` with (key, heading) ``columns``."""
    if not rows:
        return f"<p class=\"audit-empty\">{html.escape(empty)}</p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(k))}</td>" for k, _ in columns) + "</tr>" for r in rows)
    return f"<table class=\"audit-table\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _name(path: Any) -> str:
    return Path(str(path)).name if path is not None else ""


def _new(count: int | None) -> str:
    """' (n new)' when compared with a baseline, else ''."""
    return "" if count is None else f" ({count} new)"


def _short_paths(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Rows with file names instead of full paths in ``keys`` (the full path stays in audit.json)."""
    return [{**r, **{k: _name(r.get(k)) for k in keys}} for r in rows]


def render_section(report: Mapping[str, Any], class_names: Sequence[str] | None = None) -> str:
    """The audit report (``audit.json``'s content) as an HTML fragment."""
    names = list(class_names or [])

    def cls(v: Any) -> Any:
        """A class index with its name, when the name says more than the index."""
        if v is None or not 0 <= int(v) < len(names) or names[int(v)] == str(v):
            return v
        return f"{v} ({names[int(v)]})"

    parts = ["<div class=\"audit\">"]
    status = "passed" if report["passed"] else "FAILED"
    base = report.get("baseline")
    against = (f"compared with the snapshot {html.escape(str(base['name']))} ({html.escape(str(base['created']))})"
               if base else "no baseline snapshot (first audit): only absolute checks apply")
    parts.append(f"<p class=\"audit-status audit-{status.lower()}\"><strong>{status}</strong> &mdash; {against}.</p>")
    if report["regressions"]:
        parts.append("<ul class=\"audit-regressions\">" +
                     "".join(f"<li>{html.escape(r)}</li>" for r in report["regressions"]) + "</ul>")
    parts.append(_table(report["checks"], [("check", "check"), ("value", "value"), ("limit", "limit"),
                                           ("failed", "failed")], "no checks configured"))
    for note in report.get("notes", []):
        parts.append(f"<p class=\"audit-note\">{html.escape(note)}</p>")

    im = report["images"]
    parts.append("<h3>Images</h3>")
    parts.append(_table([{"files": im["files"], "unique": im["unique"], "not_extracted": im["not_extracted"],
                          "added": im.get("added"), "removed": im.get("removed"), "changed": im.get("changed"),
                          "relabelled": im.get("relabelled"), "moved_split": im.get("moved_split")}],
                        [(k, k.replace("_", " ")) for k in ("files", "unique", "not_extracted", "added", "removed",
                                                            "changed", "relabelled", "moved_split")]))
    for key, title, cols in (("added_list", "added", [("path", "file"), ("split", "split"), ("label", "label")]),
                             ("removed_list", "removed", [("path", "file"), ("split", "split")]),
                             ("changed_list", "changed (same path, new bytes)", [("path", "file")]),
                             ("relabelled_list", "relabelled", [("path", "file"), ("old_label", "was"),
                                                                ("label", "now")]),
                             ("moved_split_list", "moved to another split", [("path", "file"),
                                                                             ("old_split", "was"), ("split", "now")])):
        if im.get(key):
            parts.append(f"<h4>{html.escape(title)}</h4>" + _table(_short_paths(im[key], ["path"]), cols))

    acc = report["accuracy"]
    parts.append("<h3>Accuracy</h3>")
    parts.append(_table([{"accuracy": acc["accuracy"], "baseline": acc["baseline"], "delta": acc["delta"],
                          "labelled": acc["labelled"],
                          **{f"split {k}": v for k, v in sorted(acc["by_split"].items())}}],
                        [("accuracy", "accuracy"), ("baseline", "baseline"), ("delta", "delta"),
                         ("labelled", "labelled images"),
                         *[(f"split {k}", f"{k} split") for k in sorted(acc["by_split"])]]))
    parts.append(_table([{**r, "class": cls(r["class"])} for r in acc["per_class"]],
                        [("class", "class"), ("n", "images"), ("accuracy", "accuracy"), ("baseline", "baseline"),
                         ("delta", "delta")]))

    fl = report["flips"]
    parts.append(f"<h3>Prediction flips: {fl['count']} of {fl['compared']}</h3>")
    parts.append(_table([{**r, "label": cls(r["label"]), "old_prediction": cls(r["old_prediction"]),
                          "prediction": cls(r["prediction"])} for r in _short_paths(fl["list"], ["path"])],
                        [("path", "file"), ("label", "label"), ("old_prediction", "was predicted"),
                         ("prediction", "now predicted")], "no flips" if report.get("baseline") else "no baseline"))

    loc = report["localization"]
    parts.append("<h3>Localisation per class</h3>")
    if loc.get("note"):
        parts.append(f"<p class=\"audit-note\">{html.escape(loc['note'])}</p>")
    metric_cols = [(m, m.replace("_", " ")) for m in ("pointing", "box_accuracy", "mean_iou")]
    parts.append(_table(loc.get("methods", []), [("method", "method"), ("images", "images"), *metric_cols,
                                                 ("pointing_delta", "pointing delta"),
                                                 ("box_accuracy_delta", "box accuracy delta")], "not available"))
    if loc.get("per_class"):
        parts.append(_table([{**r, "class": cls(r["class"])} for r in loc["per_class"]],
                            [("method", "method"), ("class", "class"), ("images", "images"), *metric_cols,
                             ("pointing_delta", "pointing delta")]))

    dead = report["dead_neurons"]
    parts.append(f"<h3>Dead neurons: {dead['total']}{_new(dead.get('new'))}</h3>")
    parts.append(_table([{"layer": layer, "channels": d["channels"], "dead": len(d["dead"]),
                          "new": ", ".join(map(str, d["new"])) or None,
                          "revived": ", ".join(map(str, d["revived"])) or None}
                         for layer, d in dead["by_layer"].items()],
                        [("layer", "layer"), ("channels", "channels"), ("dead", "dead"), ("new", "newly dead"),
                         ("revived", "revived")]))

    tk = report["topk_changes"]
    parts.append(f"<h3>Neurons whose top-{tk['k']} images changed most</h3>")
    parts.append(_table(tk["most_changed"], [("layer", "layer"), ("channel", "channel"),
                                             ("jaccard_distance", "Jaccard distance"),
                                             ("new_in_top", "new images in top-k")],
                        "no baseline to compare with" if not report.get("baseline") else "none compared"))

    units = report.get("unit_labels")
    if units and units.get("compared"):
        parts.append(f"<h3>Dissected units: {units['changed']} changed label, {units['lost']} lost their concept</h3>")
        parts.append(_table(units["changed_list"], [("layer", "layer"), ("unit", "unit"), ("old_label", "was"),
                                                    ("label", "now"), ("old_iou", "IoU was"), ("iou", "IoU now")]))
        parts.append(_table(units["lost_list"], [("layer", "layer"), ("unit", "unit"), ("old_label", "was"),
                                                 ("old_iou", "IoU was"), ("iou", "IoU now"),
                                                 ("concept", "best concept now")]))

    out = report["outliers"]
    parts.append(f"<h3>Outliers ({html.escape(str(out.get('layer')))}, mean cosine distance to "
                 f"{out.get('k')} nearest)</h3>")
    parts.append(_table(_short_paths(out.get("list", []), ["path"]),
                        [("path", "file"), ("split", "split"), ("label", "label"), ("prediction", "prediction"),
                         ("score", "k-NN distance")], out.get("note") or "none"))

    dup = report["duplicates"]
    parts.append(f"<h3>Duplicates across splits: {dup['across_splits']} "
                 f"({dup['exact_across_splits']} exact, {dup['near_across_splits']} near)</h3>")
    parts.append(_table(_short_paths(dup["pairs"], ["path_a", "path_b"]),
                        [("kind", "kind"), ("similarity", "similarity"), ("path_a", "file"), ("split_a", "split"),
                         ("path_b", "file"), ("split_b", "split"), ("across_splits", "across splits")]))

    ln = report["label_noise"]
    parts.append(f"<h3>Possible label noise: {ln['count']}{_new(ln.get('new'))}</h3>")
    parts.append(_table([{**r, "label": cls(r["label"]), "prediction": cls(r["prediction"])}
                         for r in _short_paths(ln["list"], ["path"])],
                        [("path", "file"), ("split", "split"), ("label", "label"), ("prediction", "prediction"),
                         ("confidence", "confidence")]))
    rel = report.get("reliance") or {}
    parts.append("<h3>Reliance: is the model looking at the object?</h3>")
    if rel.get("note"):
        parts.append(f"<p class=\"audit-note\">{html.escape(rel['note'])}</p>")
    else:
        flagged = rel.get("flagged_classes") or []
        parts.append(f"<p class=\"audit-note\">{rel.get('images', 0)} images of split "
                     f"{html.escape(str(rel.get('split')))}; flagged classes: "
                     f"{html.escape(', '.join(map(str, flagged))) or 'none'}. {html.escape(rel.get('rule', ''))}</p>")
        parts.append(_table([r for r in rel.get("per_class", []) if r.get("flagged")],
                            [("class_name", "class"), ("method", "method"), ("images", "images"),
                             ("inside_energy", "in-object energy"), ("outside_fraction", "looking outside"),
                             ("reason", "why")], "no class flagged"))
        if rel.get("energy_drops"):
            parts.append("<h4>In-object energy dropped since the baseline</h4>" + _table(
                rel["energy_drops"], [("class_name", "class"), ("method", "method"),
                                      ("inside_energy_baseline", "was"), ("inside_energy", "now"),
                                      ("inside_energy_delta", "delta")]))
        causal = rel.get("causal_check") or {}
        if rel.get("causal"):
            parts.append(f"<h4>Causal check (fill {html.escape(str(causal.get('fill')))})</h4>" + _table(
                rel["causal"], [("class_name", "class"), ("images", "images"), ("accuracy", "accuracy"),
                                 ("object_only_retention", "object only"), ("context_only_retention", "context only"),
                                 ("mixed_same", "mixed same"), ("mixed_rand", "mixed rand"), ("bg_gap", "BG gap"),
                                 ("reason", "why flagged")]))
        elif causal.get("note"):
            parts.append(f"<p class=\"audit-note\">{html.escape(causal['note'])}</p>")
        if rel.get("drift"):
            parts.append("<h4>Explanation drift: Spearman correlation with the baseline's maps</h4>" + _table(
                sorted(rel["drift"], key=lambda r: (r.get("map_correlation") is None, r.get("map_correlation"))),
                [("class_name", "class"), ("method", "method"), ("images", "images"),
                 ("map_correlation", "mean correlation")]))
    parts.append("</div>")
    return "\n".join(parts) + "\n"
