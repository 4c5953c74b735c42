"""The model browser: pages from plain data (every unit, escaping, links that resolve, lazy images,
with and without dissection), the pages in headless Chromium, and the report stage end to end on
the tiny built-in pipeline, where a second report computes no picture."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
import pytest

from pipeline.errors import PipelineError
from pipeline.report.microscope import Layer, TopImage, Unit, build_microscope, layer_slugs, unit_tables
from pipeline.stages import run_stages
from pipeline.store import ActivationStore
from pipeline.store.dissect import write_dissection
from tests.helpers import compose_config, open_in_chromium, random_png

EVIL = "<script>window.__pwned=1</script>"
EVIL_LAYER = 'blocks.0"><img src=x onerror="window.__pwned=2">'
LINK = re.compile(r'(?:src|href)="([^"#]+)"')
IMG = re.compile(r"<img [^>]*>")


def fake_layers(root: Path, dissected: bool = True, n_units: int = 5) -> list[Layer]:
    """Two layers of fake units; the first one dissected (labels with a hostile concept and class)."""
    layers = []
    for li, name in enumerate(["features.relu1", EVIL_LAYER]):
        units = []
        for u in range(n_units):
            top = [TopImage(str(random_png(root / "data" / f"{li}_{u}_{r}.png", 100 * li + 10 * u + r)),
                            str(random_png(root / "crops" / f"{li}_{u}_{r}.png", 9000 + 100 * li + 10 * u + r)),
                            float(3 - r), EVIL if r == 0 else "seven") for r in range(3)]
            ascent = str(random_png(root / "ascent" / f"{li}_{u}.png", 5000 + u)) if u < 2 else None
            proj = {"guided backprop": [(str(random_png(root / "proj" / f"{li}_{u}.png", 7000 + u)),
                                         str(random_png(root / "patch" / f"{li}_{u}.png", 8000 + u)))]} if u < 2 else {}
            units.append(Unit(u, top, ascent, proj))
        layers.append(Layer(name, (8, 8), units, "2 of 5 units have pictures", "guided backprop only"))
    if dissected:
        labels = pd.DataFrame({"unit": range(n_units), "label": [EVIL, "stripes", None, "stripes", None],
                               "iou": [0.31, 0.12, 0.02, 0.09, np.nan], "concept": [EVIL, "stripes", "dots", "stripes",
                                                                                     None],
                               "purity": [0.5] * n_units, "top_class": [EVIL, "one", "two", "one", "two"],
                               "selectivity": [0.9, 0.4, 0.1, 0.3, 0.0]})
        dissection = pd.DataFrame({"layer": "features.relu1", "unit": [0, 0, 1], "concept": [EVIL, "dots", "stripes"],
                                   "iou": [0.31, 0.05, 0.12], "rank": [1, 2, 1]})
        rows, concepts = unit_tables(labels, dissection)
        for unit in layers[0].units:
            unit.dissect, unit.concepts = rows.get(unit.index), concepts.get(unit.index)
        layers[0].summary = {"layer": "features.relu1", "units": n_units, "labelled": 3, "unique_detectors": 2,
                             "cut": 0.04, "quantile": 0.995, "images": 40}
    return layers


def pages_of(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.html"))


def assert_links_resolve(folder: Path) -> None:
    """Every src and href of every page names a file that exists, relative to that page."""
    for page in pages_of(folder):
        for target in LINK.findall(page.read_text()):
            assert not re.match(r"^[a-z]+:", target), f"{page}: non-relative link {target}"
            assert (page.parent / target).is_file(), f"{page}: {target} does not exist"


# ---------------------------------------------------------------------------- unit tests ---

def test_pages_show_every_unit_escape_names_and_links_resolve(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "report.html").parent.mkdir(parents=True)
    (run / "report.html").write_text("<p>report</p>")
    result = build_microscope(run, f"model <{EVIL}>", fake_layers(tmp_path))
    folder = run / "microscope"
    assert result["index"] == str(folder / "index.html")
    assert result["pages"] == 1 + 2 * (1 + 5) == len(pages_of(folder)) and result["units"] == 10
    assert result["missing_files"] == 0
    assert_links_resolve(folder)
    slugs = layer_slugs(["features.relu1", EVIL_LAYER])
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", s) for s in slugs.values())
    layer_page = (folder / slugs["features.relu1"] / "index.html").read_text()
    assert all(f'href="unit-{u}.html"' in layer_page for u in range(5))       # every unit is a tile
    assert layer_page.count('class="tile"') == 5
    assert layer_page.count(">no picture yet</span>") == 3                      # units 2..4 have none yet
    assert "unlabelled (best: dots, 0.020)" in layer_page and "stripes" in layer_page
    for page in pages_of(folder):
        text = page.read_text()
        assert "<script" not in text and "onerror=" not in text.replace("onerror=&#34;", "")
        assert all('loading="lazy"' in tag for tag in IMG.findall(text))
    unit0 = (folder / slugs["features.relu1"] / "unit-0.html").read_text()
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in unit0            # label, concept, class: escaped
    assert "guided backprop" in unit0 and "unit 1 →" in unit0 and "← unit" not in unit0
    assert unit0.count("<td class=\"num\">1</td>") >= 1 and "0.310" in unit0 and "0.900" in unit0
    index = (folder / "index.html").read_text()
    assert 'href="../report.html"' in index and "not dissected" in index    # the second layer is not


def test_without_dissection_tiles_say_so_and_index_names_the_command(tmp_path: Path) -> None:
    run = tmp_path / "run"
    build_microscope(run, "tiny", fake_layers(tmp_path, dissected=False), report=None)
    folder = run / "microscope"
    index = (folder / "index.html").read_text()
    assert "python -m pipeline stage=dissect" in index and "report</a>" not in index
    layer_page = (folder / layer_slugs(["features.relu1"])["features.relu1"] / "index.html").read_text()
    assert layer_page.count("not dissected</span>") == 5
    assert_links_resolve(folder)


def test_rebuild_replaces_the_folder_and_a_failed_build_keeps_the_old_one(tmp_path: Path) -> None:
    run = tmp_path / "run"
    build_microscope(run, "first", fake_layers(tmp_path))
    build_microscope(run, "second", fake_layers(tmp_path)[:1])
    folder = run / "microscope"
    assert "second" in (folder / "index.html").read_text() and len(pages_of(folder)) == 1 + 6
    broken = fake_layers(tmp_path)
    broken[0].units[0].dissect = {"label": "x"}  # a row without the label table's columns
    with pytest.raises(jinja2.UndefinedError, match="iou"):
        build_microscope(run, "third", broken)
    assert "second" in (folder / "index.html").read_text()
    assert not [p for p in run.iterdir() if p.name.startswith(".microscope")]


def test_microscope_settings_are_checked(tmp_path: Path) -> None:
    from pipeline.config_check import check_config
    with pytest.raises(PipelineError, match=r"report.microscope.visualize=-1 is not valid: expected a number >= 0"):
        check_config(compose_config(tmp_path, ["report.microscope.visualize=-1"]))
    with pytest.raises(PipelineError, match=r"report.microscope.top_k=0 is not valid"):
        check_config(compose_config(tmp_path, ["report.microscope.top_k=0"]))


# ------------------------------------------------------------------------------ browser ---

@pytest.mark.slow
def test_pages_in_headless_chromium(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.html").write_text("<!DOCTYPE html><title>report</title>")
    build_microscope(run, EVIL, fake_layers(tmp_path))
    folder = run / "microscope"
    slug = layer_slugs(["features.relu1"])["features.relu1"]
    for page, images in [(folder / "index.html", 0), (folder / slug / "index.html", 5 + 2),
                         (folder / slug / "unit-0.html", 3 + 3 + 1 + 2)]:
        state = open_in_chromium(page, tmp_path / f"{page.stem}.png")
        assert state["errors"] == [] and state["external"] == [], page
        assert state["broken"] == [] and state["images"] == images, page
        assert state["pwned"] is None


# ------------------------------------------------------------------- the stage, end to end ---

FAST = ["visualize.ascent.steps=4", "report.sanity.enabled=false", "report.top_k=2", "report.n_channels=1",
        "report.microscope.top_k=3", "report.microscope.visualize=2", "visualize.batch_size=32"]


@pytest.mark.slow
def test_report_stage_builds_the_browser_and_a_rerun_computes_nothing(tmp_path: Path) -> None:
    summary = run_stages(compose_config(tmp_path, ["stage=[train,extract,report]", *FAST]))
    result = summary["stages"]["report"]
    folder = tmp_path / "run" / "microscope"
    assert result["microscope"] == str(folder / "index.html")
    layers = [p for p in folder.iterdir() if p.is_dir() and p.name != "files"]
    units = sum(len(list(p.glob("unit-*.html"))) for p in layers)
    assert result["microscope_units"] == units > 100 and result["microscope_pages"] == 1 + len(layers) + units
    assert result["microscope_missing_files"] == 0
    cache: dict[str, Any] = summary["cache"]
    assert cache["artifacts/ascent"]["misses"] == 2 * len(layers)               # two units per layer
    assert cache["artifacts/microscope_crops"]["misses"] > 0 and cache["artifacts/deconv"]["misses"] > 0
    assert_links_resolve(folder)
    assert 'href="microscope/index.html"' in (tmp_path / "run" / "report.html").read_text()
    first = sorted(p.relative_to(folder) for p in folder.rglob("*.html"))

    store = ActivationStore.open(tmp_path / "cache" / "store" / summary["model"]["key"], summary["model"]["key"])
    layer = store.layers()[-1]
    n = store.channels(layer)
    units = pd.DataFrame({"unit": range(n), "label": [EVIL] + [None] * (n - 1), "iou": [0.3] + [0.01] * (n - 1),
                          "concept": [EVIL] + ["dots"] * (n - 1), "purity": 0.5, "top_class": EVIL,
                          "selectivity": 0.25})
    iou = pd.DataFrame({"layer": layer, "unit": [0, 0], "concept": [EVIL, "dots"], "iou": [0.3, 0.1], "rank": [1, 2]})
    write_dissection(store, layer, iou, units, {"layer": layer, "units": n, "labelled": 1, "unique_detectors": 1,
                                                "cut": 0.04, "quantile": 0.995, "images": 120}, "k")

    again = run_stages(compose_config(tmp_path, ["stage=report", *FAST]))["cache"]
    for kind in ("artifacts/ascent", "artifacts/deconv", "artifacts/guided", "artifacts/microscope_crops"):
        assert again[kind]["misses"] == 0 and again[kind]["hits"] > 0, kind
    assert sorted(p.relative_to(folder) for p in folder.rglob("*.html")) == first
    slug = layer_slugs(store.layers())[layer]
    page = (folder / slug / "index.html").read_text()
    assert page.count("not dissected") == 0 and "&lt;script&gt;" in page and "unlabelled (best: dots" in page
    for name in ("index.html", "unit-0.html"):
        state = open_in_chromium(folder / slug / name, tmp_path / "layer.png", full_page=False)
        assert state["errors"] == [] and state["external"] == [] and state["broken"] == []
        assert state["pwned"] is None
    with pytest.raises(PipelineError, match="report.microscope.layers: 'features.relu9' matches no layer"):
        run_stages(compose_config(tmp_path, ["stage=report", "report.microscope.layers=[features.relu9]", *FAST]))
