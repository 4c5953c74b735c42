"""The HTML report: sections from plain data, escaping, linked files, graceful gaps, the sanity
checks, the report stage on the tiny built-in pipeline, and the page in a real headless Chromium."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from omegaconf import OmegaConf

from pipeline.errors import PipelineError
from pipeline.methods.saliency import Saliency
from pipeline.models.digits import DigitsCNN
from pipeline.report import build_report
from pipeline.report import sanity as rs
from pipeline.pictures import map_strip
from pipeline.report.assets import Assets
from pipeline.report.data import Overview, SanityResult, StoreNeuron, accuracy_tables
from pipeline.stages import run_stages
from pipeline.stages.report import source_dir
from tests.helpers import compose_config, open_in_chromium, random_png

EVIL_NAME = 'evil<img src=x onerror="window.__pwned=1">.png'
EVIL_CLASS = "<script>window.__pwned=1</script>"
SRC = re.compile(r'<img src="([^"]+)"')
HREF = re.compile(r'<a href="([^"#]+)"')


# ------------------------------------------------------------------------------ helpers ---

def fake_run(root: Path, n_images: int = 3, methods: tuple[str, ...] = ("saliency", "gradcam")) -> dict[str, Any]:
    """A run folder as explain, visualize and audit leave it, with pictures in a fake cache."""
    run, cache = root / "run", root / "cache"
    rows = []
    for i in range(n_images):
        name = EVIL_NAME if i == 0 else f"img_{i}.png"
        image = random_png(root / "data" / name, i)
        base = {"image_id": f"{i:064x}", "path": str(image), "split": "test", "selected_by": "random",
                "label": i % 2, "label_name": EVIL_CLASS if i == 0 else "one", "prediction": 1,
                "prediction_name": "one", "score": 0.75, "target": 1, "target_name": "one", "target_prob": 0.75,
                "panel_path": str(random_png(run / "explain" / "panels" / f"p{i}.png", 100 + i))}
        for j, m in enumerate(methods):
            folder = cache / "artifacts" / m / f"{i:02d}" / f"{i:02d}{j}"
            folder.mkdir(parents=True)
            np.save(folder / "map.npy", np.zeros((4, 4), np.float32))
            (folder / "meta.json").write_text("{}")
            random_png(folder / "overlay.png", 1000 + 10 * i + j)
            rows.append({**base, "method": m, "key": f"{i}{j}", "artifact_dir": str(folder),
                         "map_path": str(folder / "map.npy"), "overlay_path": str(folder / "overlay.png"),
                         "cached": False, "pointing_hit": 1.0, "box_iou": 0.5, "box_hit": 1.0,
                         "deletion_auc": 0.2, "insertion_auc": 0.6})
        rows.append({**base, "method": "center (baseline)", "key": None, "artifact_dir": None, "map_path": None,
                     "overlay_path": None, "cached": None, "pointing_hit": 0.0, "box_iou": 0.1, "box_hit": 0.0,
                     "deletion_auc": 0.3, "insertion_auc": 0.4})
    (run / "explain").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(run / "explain" / "artifacts.parquet", index=False)
    per = {"images": float(n_images), "pointing": 1.0, "box_accuracy": 1.0, "mean_iou": 0.5,
           "deletion_auc": 0.2, "insertion_auc": 0.6}
    (run / "explain" / "metrics.json").write_text(json.dumps(
        {"target": "predicted", "params": {"box_threshold": 0.2, "iou": 0.5},
         "methods": {m: per for m in methods}}))
    vis = [{"kind": "ascent", "layer": "features.relu4", "channel": 3, "png": str(random_png(cache / "v" / "a.png", 7))},
           {"kind": "deconv", "layer": "features.relu4", "channel": 3, "rank": 0, "image_id": "0" * 64,
            "png": str(random_png(cache / "v" / "d.png", 8)), "patch_png": str(random_png(cache / "v" / "p.png", 9))},
           {"kind": "guided", "layer": "features.relu4", "channel": 3, "rank": 0, "image_id": "0" * 64,
            "png": str(random_png(cache / "v" / "g.png", 12)), "patch_png": str(random_png(cache / "v" / "p.png", 9))},
           {"kind": "class", "class_index": 0, "class_name": EVIL_CLASS, "value": 0.9,
            "png": str(random_png(cache / "v" / "c.png", 10))}]
    (run / "visualize").mkdir()
    pd.DataFrame(vis).to_parquet(run / "visualize" / "index.parquet", index=False)
    method = {"max_spearman": 0.8, "stride": [4, 4], "grid_limit": 0.3, "projections": 1}
    (run / "visualize" / "projections.json").write_text(json.dumps({"layer": "features.relu4", "note": "configured", "methods": {
        "deconvnet": {**method, "title": "deconvnet", "input_dependence": 0.93, "per_channel": {"3": 0.93},
                      "flagged": True, "reason": f"{EVIL_CLASS} has no max-pool switches", "grid_dominated": 1,
                      "grid_note": "1 of 1 deconvnet projections have more than 30% of their power on the grid"},
        "guided_backprop": {**method, "title": "guided backprop", "input_dependence": 0.12, "per_channel": {"3": 0.12},
                            "flagged": False, "reason": "", "grid_dominated": 0, "grid_note": ""}}}))
    (run / "audit").mkdir()
    (run / "audit" / "section.html").write_text('<p id="audit-fragment">3 images added</p>')
    pd.DataFrame({"path": [str(root / "data" / "bad<b>.png")], "reason": ["truncated"]}).to_csv(
        run / "quarantine.csv", index=False)
    overview = Overview(dataset={"name": "fake", "images": n_images, "quarantined": 1},
                        model={"name": "tiny", "classes": 2, "key": "ab" * 32},
                        splits=pd.DataFrame([{"split": "test", "images": 3, "labelled": 3, "correct": 2,
                                              "accuracy": 2 / 3}]),
                        per_class=pd.DataFrame([{"class": 0, "name": EVIL_CLASS, "images": 2, "accuracy": 0.5}]),
                        quarantine=pd.read_csv(run / "quarantine.csv"), stages={"explain": {"images": 3, "seconds": 1.0}})
    neuron = StoreNeuron("features.relu4", 3, [str(root / "data" / EVIL_NAME)], ["#1 2.00"],
                         [str(random_png(cache / "crops" / "0.png", 11, 16))], 2.0)
    strip = map_strip(np.random.default_rng(0).random((3, 8, 8)))
    strip.save(root / "strip.png")
    sanity = [SanityResult("saliency", "pass", "", 2, ["fc", "conv1"], [0.3, 0.1], 0.1, 0.2, 0.8, True, True,
                           str(root / "strip.png")),
              SanityResult("gradcam", "fail", "maps barely change", 2, ["fc", "conv1"], [0.9, 0.8], 0.8, 0.99, 0.01,
                           False, False, None),
              SanityResult("cam", "n/a", "no GAP head")]
    return {"run": run, "overview": overview, "neurons": [neuron], "sanity": sanity}


def build_fake(root: Path, **kw: Any) -> tuple[Path, Assets]:
    f = fake_run(root, **kw)
    return build_report(f["run"], "fake <report>", "subtitle", overview=f["overview"], neurons=f["neurons"],
                        sanity=f["sanity"])


def local_targets(page: Path) -> tuple[list[str], list[str]]:
    text = page.read_text()
    return SRC.findall(text), HREF.findall(text)


# ---------------------------------------------------------------------------- unit tests ---

def test_report_has_every_section_escapes_names_and_links_local_files(tmp_path: Path) -> None:
    page, assets = build_fake(tmp_path)
    text = page.read_text()
    for title in ("Dataset and model", "Neurons", "Explanations", "Explanation quality", "Sanity checks", "Audit"):
        assert f">{title}</h2>" in text
    assert "<img src=x" not in text and "<script" not in text and "&lt;script&gt;" in text
    assert "evil&lt;img src=x onerror=&quot;window.__pwned=1&quot;&gt;.png" in text
    assert "<title>fake &lt;report&gt;</title>" in text
    assert '<p id="audit-fragment">3 images added</p>' in text
    srcs, hrefs = local_targets(page)
    assert len(srcs) == 3 * 3 + 1 + 1 + 5 + 1 + 1  # inputs+overlays, top image, crop, vis pictures, class, strip
    for target in srcs + hrefs:
        assert not re.match(r"^[a-z]+:", target), target  # relative only: no network, no absolute paths
        assert (page.parent / target).is_file(), target
    assert sum(h.endswith(".map.npy") for h in hrefs) == 6 and sum(h.endswith(".meta.json") for h in hrefs) == 6
    assert "FAIL" in text and "n/a" in text and "no GAP head" in text
    neurons = text[text.index(">Neurons</h2>"):text.index(">Explanations</h2>")]
    assert "deconvnet projections | patches · input Spearman 0.93" in neurons
    assert "guided backprop projections | patches · input Spearman 0.12" in neurons
    assert neurons.count("image-independent") == 2       # the summary row and channel 3's deconvnet heading
    assert "has no max-pool switches" in neurons and "power on the grid" in neurons
    assert "<img src=x" not in neurons
    assert not assets.missing
    assert not [p for p in page.parent.iterdir() if p.name.startswith(".")]


def test_sections_say_when_their_stage_did_not_run(tmp_path: Path) -> None:
    page, _ = build_report(tmp_path / "run", "empty", "", overview_note="The dataset could not be loaded.",
                           store_note="No activation store: run stage=extract.", sanity_note="Sanity checks are off.")
    text = page.read_text()
    assert "<img" not in text
    for said in ("The dataset could not be loaded.", "No activation store: run stage=extract.",
                 "stage=visualize did not run", "stage=explain did not run", "Sanity checks are off.",
                 "stage=audit did not run"):
        assert said in text


def test_missing_artifact_files_show_as_missing_not_broken(tmp_path: Path) -> None:
    f = fake_run(tmp_path)
    table = pd.read_parquet(f["run"] / "explain" / "artifacts.parquet")
    os.unlink(table["overlay_path"].dropna().iloc[0])
    page, assets = build_report(f["run"], "t", "")
    assert len(assets.missing) == 1 and 'class="missing"' in page.read_text()
    for src in local_targets(page)[0]:
        assert (page.parent / src).is_file()


def test_assets_hardlink_dedupe_copy_and_rebuild(tmp_path: Path) -> None:
    src = random_png(tmp_path / "a b&c.png", 0)
    linked = Assets(tmp_path / "files", "files", "hardlink")
    url = linked.file(src, "g")
    assert url == linked.file(src, "g") and url.startswith("files/g/") and url.endswith(".png")
    assert os.stat(tmp_path / url).st_ino == os.stat(src).st_ino
    copied = Assets(tmp_path / "copies", "copies", "copy")
    assert os.stat(tmp_path / copied.file(src, "g")).st_ino != os.stat(src).st_ino
    assert linked.file(tmp_path / "nope.png", "g") is None and linked.missing == [str(tmp_path / "nope.png")]
    tif = tmp_path / "x.tif"
    Image.new("RGB", (600, 300), "blue").save(tif)
    converted = linked.image(tif, "g", max_side=64)
    assert converted.endswith(".png") and Image.open(tmp_path / converted).size == (64, 32)
    page1, _ = build_fake(tmp_path / "r")
    first = set(os.listdir(page1.parent / "report_files"))
    page2, _ = build_report(page1.parent, "again", "")
    assert page1 == page2 and "again" in page2.read_text()
    assert set(os.listdir(page2.parent / "report_files")) <= first
    assert not [p for p in page2.parent.iterdir() if p.name.startswith(".")]


def test_accuracy_tables_per_split_and_class() -> None:
    images = pd.DataFrame({"split": ["train", "train", "test", "test", "test"],
                           "label": pd.array([0, 1, 1, 1, pd.NA], dtype="Int64"),
                           "prediction": pd.array([0, 0, 1, 0, 1], dtype="Int64")})
    splits, per_class = accuracy_tables(images, ["zero", "one"])
    got = splits.set_index("split")
    assert got.loc["train", "accuracy"] == 0.5 and got.loc["test", "accuracy"] == 0.5
    assert got.loc["test", "images"] == 3 and got.loc["test", "labelled"] == 2
    assert got.loc["all", "correct"] == 2 and got.loc["all", "labelled"] == 4
    assert per_class.set_index("name")["accuracy"].to_dict() == {"zero": 1.0, "one": 1 / 3}


def test_sanity_flags_a_model_independent_method_and_passes_saliency() -> None:
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    x = torch.randn(2, 1, 64, 64)
    top2 = model(x).topk(2, dim=1).indices
    edge_map = lambda m, xx, t: xx.abs().sum(1)  # noqa: E731 - ignores the model and the class
    result, cascade = rs.check(model, x, top2[:, 0], top2[:, 1], edge_map, None, 0)
    assert result["steps"][-1] == pytest.approx(1.0) and result["class_spearman"] == pytest.approx(1.0)
    rand_ok, class_ok, input_ok, reason = rs.verdict(result, 0.5, 0.95, 0.8)
    assert rand_ok is False and class_ok is False and "randomised" in reason and "two classes" in reason
    assert input_ok is True and abs(result["input_spearman"]) < 0.1     # it does follow the image
    assert cascade.shape == (1 + len(result["layers"]), 64, 64)
    result, _ = rs.check(model, x, top2[:, 0], top2[:, 1], Saliency(), ["fc", "features.conv4"], 0)
    assert result["layers"] == ["fc", "features.conv4"] and result["images"] == 2
    assert rs.verdict(result, 0.5, 0.95, 0.8)[:3] == (True, True, True)
    zero = lambda m, xx, t: torch.zeros(xx.shape[0], 64, 64)  # noqa: E731
    assert rs.verdict(rs.check(model, x, top2[:, 0], top2[:, 1], zero, ["fc"], 0)[0], 0.5, 0.95, 0.8)[:3] == (
        None, None, None)


def test_sanity_input_check_flags_a_map_that_ignores_the_image() -> None:
    """Kindermans et al.'s input side: a map that follows the model and the class but not the image."""
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    x = torch.randn(3, 1, 64, 64)
    top2 = model(x).topk(2, dim=1).indices

    def blind(m: torch.nn.Module, xx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The fc weights of the target class, tiled over the image: no pixel of ``xx`` is read."""
        w = m.fc.weight[t.long()].detach()                     # (B, 128)
        return w.repeat(1, 32)[:, :4096].view(-1, 64, 64) + 0 * xx.sum()

    result, _ = rs.check(model, x, top2[:, 0], top2[:, 1], blind, ["fc"], 0)
    assert result["input_spearman"] == pytest.approx(1.0) and result["input_target"] == int(top2[0, 0])
    rand_ok, class_ok, input_ok, reason = rs.verdict(result, 0.5, 0.95, 0.8)
    assert input_ok is False and "do not depend on the image" in reason
    assert rand_ok is True and class_ok is True


def test_report_source_latest_is_the_newest_run_with_stage_outputs(tmp_path: Path) -> None:
    def ctx(run: Path) -> Any:
        return type("Ctx", (), {"cfg": OmegaConf.create({"paths": {"outputs": str(tmp_path)}}), "run_dir": run})()

    now = tmp_path / "runs" / "2026-01-02" / "10-00-00"
    now.mkdir(parents=True)
    assert source_dir(ctx(now), "latest") == now  # nothing earlier: this run
    old, new = tmp_path / "runs" / "2026-01-01" / "09-00-00", tmp_path / "multirun" / "2026-01-01" / "09-30-00" / "1"
    for i, run in enumerate((old, new)):
        (run / "explain").mkdir(parents=True)
        (run / "explain" / "artifacts.parquet").write_bytes(b"x")
        os.utime(run / "explain" / "artifacts.parquet", (1000 + i, 1000 + i))
    assert source_dir(ctx(now), "latest") == new
    assert source_dir(ctx(now), None) == now and source_dir(ctx(now), str(old)) == old
    with pytest.raises(PipelineError, match="report.source=.*no such run folder"):
        source_dir(ctx(now), str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------ browser ---

@pytest.mark.slow
def test_report_in_headless_chromium(tmp_path: Path) -> None:
    page, _ = build_fake(tmp_path)
    shot = tmp_path / "report.png"
    state = open_in_chromium(page, shot)
    assert state["errors"] == [] and state["external"] == []
    assert state["images"] == 18 and state["broken"] == []  # with the guided projection and its patch
    assert state["pwned"] is None  # escaped names never ran as markup
    assert state["sections"][0] == "Dataset and model" and state["sections"][-1] == "Audit"
    assert shot.stat().st_size > 10_000 and Image.open(shot).size[0] == 1280


# ------------------------------------------------------------------- the stage, end to end ---

STAGE_FAST = ["explain.metrics.steps=4", "explain.occlusion.stride=16", "visualize.ascent.steps=8",
              "explain.select.random=2", "explain.select.misclassified=1", "report.sanity.images=2",
              "report.sanity.costly_images=1", "report.top_k=4", "report.n_channels=2"]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("report_stage")
    summary = run_stages(compose_config(root, ["stage=[train,extract,index,explain,visualize,report]", *STAGE_FAST]))
    return root, summary


@pytest.mark.slow
def test_report_stage_on_the_tiny_pipeline(pipeline_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    root, summary = pipeline_run
    result = summary["stages"]["report"]
    page = Path(result["report"])
    assert page == root / "run" / "report.html" and result["missing_files"] == 0
    assert result["explained_images"] == 3 and result["neurons"] >= 2
    assert set(result["sanity"]) == {"saliency", "occlusion", "cam", "gradcam"}
    assert all(v in ("pass", "fail") for v in result["sanity"].values())
    assert summary["cache"]["artifacts/sanity"] == {"hits": 0, "misses": 4}
    assert summary["cache"]["artifacts/report_crops"] == {"hits": 0, "misses": 4}  # one per store layer
    text = page.read_text()
    assert "stage=explain did not run" not in text and "stage=visualize did not run" not in text
    assert "Accuracy (activation store)" in text and "receptive-field crops" in text and "gradient ascent" in text
    state = open_in_chromium(page, tmp_path / "stage.png", full_page=False)
    assert state["errors"] == [] and state["external"] == [] and state["broken"] == [] and state["images"] > 40


@pytest.mark.slow
def test_report_stage_rerun_reads_sanity_from_cache_and_another_run(pipeline_run: tuple[Path, dict[str, Any]],
                                                                    tmp_path: Path) -> None:
    root, _ = pipeline_run
    cfg = compose_config(tmp_path, ["stage=report", f"report.source={root / 'run'}", f"paths.cache={root / 'cache'}",
                                    *STAGE_FAST])
    new_run = tmp_path / "run"
    summary = run_stages(cfg)
    result = summary["stages"]["report"]
    assert result["source"] == str(root / "run") and Path(result["report"]).parent == new_run
    assert summary["cache"]["artifacts/sanity"] == {"hits": 4, "misses": 0}
    assert summary["cache"]["artifacts/report_crops"]["misses"] == 0
    assert result["explained_images"] == 3
    with pytest.raises(PipelineError, match="report.layers: 'features.relu9' matches no layer"):
        run_stages(compose_config(root, ["stage=report", "report.layers=[features.relu9]", "report.sanity.enabled=false"]))
    with pytest.raises(PipelineError, match="report.sanity.methods: no sanity check for 'salency'.*saliency"):
        run_stages(compose_config(root, ["stage=report", "report.sanity.methods=[salency]"]))
