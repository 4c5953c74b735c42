"""The model browser: static pages that show every unit of every layer, from plain data.

``<run>/microscope/index.html`` lists the layers; ``<layer>/index.html`` shows each unit of a layer
as a tile (its concept label, the receptive-field crop of its top image, its gradient-ascent
picture), and ``<layer>/unit-<k>.html`` one unit: its top dataset images with their crops, its
gradient-ascent picture, its deconvnet / guided-backprop projections, its concept IoUs and class
selectivity. Pages are jinja2 templates with autoescaping (every name from a model, a dataset or a
concept table is escaped), plain HTML and inline CSS (no scripts, nothing fetched), images
``loading="lazy"``. Pictures are hard-linked (or copied) into ``microscope/files/`` under generated
names; the folder is built beside the old one and swapped in whole.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from pipeline.report.assets import Assets
from pipeline.report.html import CSS, fmt
from pipeline.report.microscope_templates import EXTRA_CSS, TEMPLATES
from pipeline.pictures import safe_name

FOLDER = "microscope"
FILES = "files"
INDEX = "index.html"
DISSECT_COMMAND = "python -m pipeline stage=dissect"
CONCEPTS_SHOWN = 10


@dataclass
class TopImage:
    """One of a unit's top dataset images: its file, its receptive-field crop, activation, class name."""

    path: str
    crop: str | None
    value: float
    label: str = ""


@dataclass
class Unit:
    """One unit (channel) of a layer and what the browser shows of it; pictures are file paths."""

    index: int
    top: list[TopImage]
    ascent: str | None = None
    projections: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # title -> (projection, patch)
    dissect: dict[str, Any] | None = None      # one row of the unit-label table
    concepts: pd.DataFrame | None = None       # concept, iou, rank (1 = best) of this unit


@dataclass
class Layer:
    """A layer's units plus what its pages say about the pictures and the labels."""

    name: str
    hw: tuple[int, int]
    units: list[Unit]
    picture_note: str = ""        # why some units have no picture yet, and the setting that adds them
    projection_note: str = ""     # which projections are drawn and why
    summary: dict[str, Any] | None = None   # the dissection summary; None when not dissected


def unit_tables(labels: pd.DataFrame | None, dissection: pd.DataFrame | None
                ) -> tuple[dict[int, dict[str, Any]], dict[int, pd.DataFrame]]:
    """The label row and the ranked concept rows of each unit, from the dissection's two tables."""
    rows = {} if labels is None else {int(r["unit"]): r for r in labels.to_dict("records")}
    concepts: dict[int, pd.DataFrame] = {}
    if dissection is not None and len(dissection):
        ranked = dissection.sort_values(["unit", "rank"], kind="stable")
        concepts = {int(u): g.head(CONCEPTS_SHOWN) for u, g in ranked.groupby("unit", sort=False)}
    return rows, concepts


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and pd.isna(value)) and value is not pd.NA


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.DictLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    env.tests["present"] = _present
    return env


def layer_slugs(names: Sequence[str]) -> dict[str, str]:
    """A distinct, file-name-safe folder name per layer (generated, never a raw layer name in a URL)."""
    out: dict[str, str] = {}
    for i, name in enumerate(names):
        slug = safe_name(name)
        out[name] = slug if slug not in out.values() else f"{slug}-{i}"
    return out


class _Pages:
    """Renders the pages into a temporary folder, placing pictures through one :class:`Assets`."""

    def __init__(self, root: Path, mode: str, title: str, report: str | None) -> None:
        self.root = root
        self.assets = Assets(root / FILES, FILES, mode)
        self.env = _environment()
        self.title = title
        self.report = report
        self.pages = 0

    def write(self, relative: str, template: str, **values: Any) -> None:
        up = "../" * relative.count("/")
        text = self.env.get_template(template).render(css=CSS, extra_css=EXTRA_CSS, title=self.title, up=up,
                                                      report=self.report, **values)
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        self.pages += 1

    def picture(self, src: str | None, group: str) -> str | None:
        return self.assets.image(src, group)

    def unit_view(self, unit: Unit) -> dict[str, Any]:
        """What the templates show of ``unit``: placed picture URLs and its label fields."""
        top = [{"image": self.picture(t.path, "inputs"), "crop": self.picture(t.crop, "crops"), "value": t.value,
                "label": t.label, "name": Path(t.path).name} for t in unit.top]
        projections = {title: [(self.picture(p, "projections"), self.picture(q, "projections")) for p, q in pairs]
                       for title, pairs in unit.projections.items()}
        classes = Counter(t.label for t in unit.top if t.label)
        concepts = [] if unit.concepts is None else unit.concepts[["concept", "iou", "rank"]].to_dict("records")
        return {"index": unit.index, "top": top, "crop": top[0]["crop"] if top else None,
                "ascent": self.picture(unit.ascent, "ascent"), "projections": projections,
                "dissect": unit.dissect, "concepts": concepts, "classes": classes.most_common(),
                "mean": sum(t.value for t in unit.top) / len(unit.top) if unit.top else float("nan")}


def _labelled_concepts(units: list[dict[str, Any]]) -> list[tuple[str, list[int]]]:
    """Concept -> the units labelled with it, most units first (a layer's detectors)."""
    groups: dict[str, list[int]] = {}
    for u in units:
        label = (u["dissect"] or {}).get("label")
        if _present(label):
            groups.setdefault(str(label), []).append(u["index"])
    return sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))


def build_microscope(run_dir: Path, title: str, layers: Sequence[Layer], mode: str = "hardlink",
                     report: str | None = "../report.html") -> dict[str, Any]:
    """Write ``<run_dir>/microscope/`` (index, one page per layer, one per unit) and its pictures.

    ``report`` is the main report's URL relative to the index page (None: no link). Returns the
    index path and counts: pages, units, linked files and files that were missing."""
    out = run_dir / FOLDER
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{FOLDER}.", suffix=".tmp"))
    try:
        pages = _Pages(tmp, mode, title, report)
        slugs = layer_slugs([layer.name for layer in layers])
        rows = []
        for layer in layers:
            rows.append(_write_layer(pages, layer, slugs[layer.name]))
        pages.write(INDEX, "index.html", layers=rows, dissect_command=DISSECT_COMMAND,
                    dissected=any(r["dissected"] for r in rows))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{FOLDER}.old.{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    assets = pages.assets
    return {"index": str(out / INDEX), "pages": pages.pages, "units": sum(len(layer.units) for layer in layers),
            "files": len([u for u in assets.placed.values() if u]), "missing_files": len(assets.missing),
            "missing": assets.missing[:5]}


def _write_layer(pages: _Pages, layer: Layer, slug: str) -> dict[str, Any]:
    """The layer's page and its units' pages; returns the index page's row for the layer."""
    units = [pages.unit_view(u) for u in layer.units]
    dissected = layer.summary is not None
    common = {"layer": layer.name, "hw": layer.hw, "dissected": dissected, "summary": layer.summary,
              "dissect_command": DISSECT_COMMAND}
    pages.write(f"{slug}/{INDEX}", "layer.html", units=units, picture_note=layer.picture_note,
                projection_note=layer.projection_note, detectors=_labelled_concepts(units), **common)
    for i, unit in enumerate(units):
        prev = units[i - 1]["index"] if i > 0 else None
        nxt = units[i + 1]["index"] if i + 1 < len(units) else None
        pages.write(f"{slug}/unit-{unit['index']}.html", "unit.html", unit=unit, prev=prev, next=nxt,
                    projection_note=layer.projection_note, picture_note=layer.picture_note, **common)
    return {"name": layer.name, "slug": slug, "units": len(units), "hw": layer.hw, "dissected": dissected,
            "labelled": (layer.summary or {}).get("labelled"), "unique": (layer.summary or {}).get("unique_detectors"),
            "pictured": sum(1 for u in units if u["ascent"])}
