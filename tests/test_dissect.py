"""Network Dissection: exact thresholds, IoU of units built to fire on a known concept, purity and
selectivity, the stage end to end (cache, incremental re-run, bad input), the concept query."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.dissect import concepts as cpt
from pipeline.dissect import iou as iou_m
from pipeline.dissect import selectivity as sel
from pipeline.dissect import threshold as thr
from pipeline.errors import PipelineError
from pipeline.runtime import Context
from pipeline.stages import run_stages
from pipeline.store.dissect import read_dissect_summary, read_dissection, read_unit_labels

SIDE = 32
SQUARE = 8


# --------------------------------------------------------------------------------- maths ---

@pytest.mark.parametrize("q", [0.005, 0.013, 0.2, 1.0])
def test_streaming_threshold_equals_the_full_array_quantile(q: float) -> None:
    rng = np.random.default_rng(1)
    maps = (rng.standard_normal((37, 6, 5, 7)) * 4).astype(np.float16)
    maps[maps < -2] = 0  # many ties, as after a ReLU, and negatives
    batches = [maps[i:i + 8] for i in range(0, len(maps), 8)]
    n = maps.shape[0] * 35
    m = thr.quantile_count(q, n)
    bins, higher = thr.pick_bins(sum(thr.coarse_counts(b) for b in batches), m)
    fine = 0
    for b in batches:  # only the candidate pairs' maps, as the stage reads them
        images, units = np.nonzero(thr.candidates(b.reshape(*b.shape[:2], -1).max(axis=2), bins))
        fine = fine + thr.fine_counts(b[images, units], units, bins)
    t = thr.thresholds(fine, bins, higher, m)
    full = np.moveaxis(maps, 1, 0).reshape(6, -1).astype(np.float32)
    np.testing.assert_array_equal(t, np.quantile(full, 1 - m / n, axis=1, method="higher"))
    np.testing.assert_array_equal(t, np.sort(full, axis=1)[:, -m])
    if q * n == int(q * n):  # a whole number of values above: the plain top-q quantile
        np.testing.assert_array_equal(t, np.quantile(full, 1 - q, axis=1, method="higher"))


def test_order_keys_sort_like_the_values() -> None:
    v = np.array([-np.inf, -3, -0.5, -1e-5, 0, 1e-5, 0.5, 2, 60000, np.inf], np.float16)
    keys = thr.order_keys(v).astype(np.int64)
    assert np.all(np.diff(keys) > 0)
    np.testing.assert_array_equal(thr.key_values(thr.order_keys(v)), v.astype(np.float32))


def test_a_unit_firing_exactly_on_a_square_has_iou_one_with_it() -> None:
    rng = np.random.default_rng(0)
    b, size = 10, (16, 16)
    maps = torch.zeros(b, 2, 8, 8)
    square = torch.zeros(b, 16, 16, dtype=torch.bool)
    other = torch.zeros(b, 16, 16, dtype=torch.bool)
    for i in range(b):
        y, x = (int(v) for v in rng.integers(0, 6, size=2))
        maps[i, 0, y:y + 2, x:x + 2] = 1.0 + rng.random()  # unit 0: the square, at half resolution
        square[i, 2 * y:2 * y + 4, 2 * x:2 * x + 4] = True
        other[i] = ~square[i]
    maps[:, 1] = torch.rand(b, 8, 8) * 0.1  # unit 1: weak noise everywhere
    t = torch.tensor([0.5, 0.05])
    wy, wx = iou_m.upsample_weights(8, 16), iou_m.upsample_weights(8, 16)
    up = torch.nn.functional.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    assert torch.allclose(wy @ maps @ wx.T, up, atol=1e-6)
    bits = square.flatten(1).long() + (other.flatten(1).long() << 1)  # slot 0: square, slot 1: the rest
    ids = torch.tensor([[0, 2]] * b)  # concept 1 is never present

    def overlaps(maps: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor) -> np.ndarray:
        acc = iou_m.Overlaps(2, 3)
        ay, ax = iou_m.axis_groups(wy), iou_m.axis_groups(wx)
        for lo in (0, 5):  # two batches
            images, units = torch.nonzero(torch.ones(5, 2, dtype=torch.bool), as_tuple=True)
            codes = iou_m.slot_codes(bits[lo:lo + 5], ids[lo:lo + 5], 3)
            acc.add_concepts(codes)
            pairs = maps[lo:lo + 5][images, units]
            acc.add_units(pairs, thr.block_maxima(pairs[:, None])[:, 0], t[units], images, units, ay, ax, codes)
        return acc.iou()

    iou = overlaps(maps, wy, wx)
    # bilinear upsampling of a 2x2 block at 2x covers the 4x4 square and blurs half a pixel out
    assert iou[0, 0] > 0.5 and iou[0, 0] == iou[0].max()
    assert iou[0, 1] == 0 and iou[0, 2] < 0.05
    table = iou_m.iou_table("l", iou, ["square", "absent", "rest"])
    assert table[table["unit"] == 0]["concept"].tolist()[0] == "square"
    assert sorted(table["rank"][table["unit"] == 1]) == [1, 2, 3]
    best = iou_m.best_concepts(iou, ["square", "absent", "rest"], 0.04)
    assert best.loc[0, "label"] == "square"
    exact = overlaps(maps.repeat_interleave(2, 2).repeat_interleave(2, 3), torch.eye(16), torch.eye(16))
    assert exact[0, 0] == pytest.approx(1.0) and exact[0, 2] == 0.0


def test_purity_and_selectivity_index() -> None:
    assert sel.purity([3, 3, 1, None, 3]) == (0.75, 3)
    assert np.isnan(sel.purity([None, None])[0])
    means = sel.class_means(np.array([[4.0, 2.0], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]), np.array([2, 1, 1, 0]))
    assert np.isnan(means[3]).all()
    si = sel.selectivity_index(means)
    assert si[0] == pytest.approx((2 - 1) / (2 + 1)) and si[1] == pytest.approx(0.0)
    assert np.isnan(sel.selectivity_index(means[:1])).all()


def test_concepts_from_boxes_masks_and_fragments(tmp_path: Path) -> None:
    from torchvision import transforms as T

    Image.fromarray(np.pad(np.ones((4, 4), np.uint8) * 255, ((0, 12), (0, 12))), "L").save(tmp_path / "m.png")
    Image.new("L", (8, 8)).save(tmp_path / "small.png")
    rec = {"box_x0": 8.0, "box_y0": 8.0, "box_x1": 12.0, "box_y1": 12.0, "mask": None,
           "fragment_boxes": "0,0,2,2;14,14,16,16", "concepts": f"spot={tmp_path / 'm.png'};bad={tmp_path / 'small.png'}"}
    items, problems = cpt.image_concepts(rec, "3", (16, 16), T.Compose([T.Resize(32), T.ToTensor()]), (32, 32), (16, 16))
    got = dict(items)
    assert set(got) == {"3", "fragment", "spot", "background"} and len(problems) == 1 and "8x8" in problems[0]
    assert got["3"].sum() == 16 and got["3"][8:12, 8:12].all()
    assert got["fragment"].sum() == 8 and got["spot"][:4, :4].all() and got["spot"].sum() == 16
    assert got["background"].sum() == 256 - 16 - 8
    names = cpt.concept_names(["0", "3"], [rec, {"concepts": None, "fragment_boxes": ""}])
    assert names == ["0", "3", "fragment", "bad", "spot", "background"]
    assert cpt.iou_size((224, 224), 112) == (112, 112) and cpt.iou_size((64, 64), 112) == (64, 64)
    assert cpt.iou_size((224, 224), None) == (224, 224)


def test_same_frame_concepts_equal_the_transformed_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Images the transform leaves in place skip the transform steps (masks read as they are, boxes
    only clipped): the same masks and problems as through every step."""
    from torchvision import transforms as T

    mask = np.zeros((16, 16), np.uint8)
    mask[3:9, 5:12] = 200
    Image.fromarray(mask, "L").save(tmp_path / "obj.png")
    Image.fromarray(mask).convert("RGB").save(tmp_path / "rgb.png")
    Image.new("L", (8, 8)).save(tmp_path / "small.png")
    rec = {"box_x0": 2.0, "box_y0": 2.0, "box_x1": 13.0, "box_y1": 10.0, "mask": str(tmp_path / "obj.png"),
           "fragment_boxes": "-3,-3,2.4,2;14.6,12,20,20;30,30,40,40",
           "concepts": f"rgb={tmp_path / 'rgb.png'};bad={tmp_path / 'small.png'};gone={tmp_path / 'no.png'}"}
    args = (rec, "7", (16, 16), T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor()]), (16, 16), (8, 8))
    assert cpt.same_frame(*args[2:5])
    fast, fast_problems = cpt.image_concepts(*args)
    monkeypatch.setattr(cpt, "same_frame", lambda *a: False)
    slow, slow_problems = cpt.image_concepts(*args)
    assert [n for n, _ in fast] == [n for n, _ in slow] == ["7", "fragment", "rgb", "background"]
    for (_, a), (_, b) in zip(fast, slow):
        assert a.dtype == b.dtype == bool and np.array_equal(a, b)
    assert len(fast_problems) == len(slow_problems) == 2 and "8x8" in fast_problems[0]


# --------------------------------------------------------------------------------- stage ---

class SquareNet(nn.Module):
    """features.0: unit 0 = relu(brightness) (the bright square), unit 1 = relu(-brightness); GAP; fc."""

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            conv.weight.copy_(torch.tensor([[1 / 3] * 3, [-1 / 3] * 3]).view(2, 3, 1, 1))
            conv.bias.zero_()
        self.features = nn.Sequential(conv, nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def _square_dataset(root: Path, n: int, bad: bool = False) -> Path:
    """``n`` black images with one bright square; class 1 squares are brighter than class 0's. The
    manifest names each square's mask as the concept 'square' and a top-left patch as 'corner'."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    corner = np.zeros((SIDE, SIDE), np.uint8)
    corner[:SQUARE, :SQUARE] = 255
    Image.fromarray(corner, "L").save(root / "corner.png")
    rows = []
    for i in range(n):
        label = i % 2
        y, x = (int(v) for v in rng.integers(SQUARE, SIDE - SQUARE + 1, size=2))
        img = np.zeros((SIDE, SIDE), np.uint8)
        img[y:y + SQUARE, x:x + SQUARE] = 255 if label else 160
        Image.fromarray(img, "L").convert("RGB").save(root / f"img{i}.png")
        mask = np.zeros((SIDE, SIDE), np.uint8)
        mask[y:y + SQUARE, x:x + SQUARE] = 255
        Image.fromarray(mask, "L").save(root / f"sq{i}.png")
        rows.append({"path": f"img{i}.png", "label": label, "concepts": f"square=sq{i}.png;corner=corner.png"})
    if bad:
        rows[0]["concepts"] = "square=gone.png;corner=corner.png"
        Image.new("L", (8, 8)).save(root / "small.png")
        rows[1]["concepts"] = "square=small.png;corner=corner.png"
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def _overrides(manifest: Path, *extra: str) -> list[str]:
    return ["model=custom", "model._target_=tests.test_dissect.SquareNet", f"model.image_size={SIDE}",
            "model.mean=[0.5,0.5,0.5]", "model.std=[0.5,0.5,0.5]", "data=manifest", f"data.path={manifest}",
            "extract.layers=[features.1]", "dissect.quantile=0.1", "dissect.top_k=6", *extra]


def test_stage_finds_the_square_detector_and_reruns_incrementally(make_cfg, tmp_path: Path) -> None:
    manifest = _square_dataset(tmp_path / "data", 24)
    summary = run_stages(make_cfg(_overrides(manifest, "stage=[extract,dissect]")))
    res = summary["stages"]["dissect"]
    assert res["forwarded"] == 24 and res["skipped_masks"] == 0
    ctx = Context(make_cfg(_overrides(manifest, "stage=dissect")))
    store = ctx.store()
    table = read_dissection(store, "features.1")
    assert list(table.columns) == ["layer", "unit", "concept", "iou", "rank"]
    sq = table[(table["unit"] == 0)].set_index("concept")["iou"]
    assert sq["square"] == pytest.approx(1.0) and sq["corner"] == 0.0
    units = read_unit_labels(store, "features.1")
    assert units.loc[0, "label"] == "square" and units.loc[1, "label"] is None
    # unit 0's top images (by max) are the bright class-1 squares; its class means are 1.0 vs 0.255
    # times the square's share of the image, so the index is (1 - 0.255) / (1 + 0.255)
    assert units.loc[0, "purity"] == 1.0 and units.loc[0, "top_class"] == "1"
    assert units.loc[0, "selectivity"] == pytest.approx((1 - 0.2549) / (1 + 0.2549), abs=2e-3)
    assert read_dissect_summary(store, "features.1") == {
        "layer": "features.1", "units": 2, "labelled": 1, "unique_detectors": 1, "cut": 0.04, "quantile": 0.1,
        "images": 24}
    # unchanged: nothing recomputed; one image more: only that image goes through the model
    again = run_stages(make_cfg(_overrides(manifest, "stage=dissect")))["stages"]["dissect"]
    assert again["recomputed"] == [] and again["forwarded"] == 0
    _square_dataset(tmp_path / "data", 25)
    more = run_stages(make_cfg(_overrides(manifest, "stage=[extract,dissect]")))["stages"]["dissect"]
    assert more["forwarded"] == 1 and more["recomputed"] == ["features.1"] and more["images"] == 25
    assert read_dissect_summary(store, "features.1")["images"] == 25


def test_concept_query_ranks_units(make_cfg, tmp_path: Path) -> None:
    manifest = _square_dataset(tmp_path / "data", 12)
    run_stages(make_cfg(_overrides(manifest, "stage=[extract,dissect]")))
    res = run_stages(make_cfg(_overrides(manifest, "stage=query", "query.type=concept", "query.concept=square",
                                         "query.k=2")))["stages"]["query"]
    table = pd.read_parquet(res["table"])
    assert table["unit"].tolist() == [0, 1] and table["iou"].iloc[0] == pytest.approx(1.0)
    assert Path(res["grid"]).is_file()
    with pytest.raises(PipelineError, match="Did you mean: square"):
        run_stages(make_cfg(_overrides(manifest, "stage=query", "query.type=concept", "query.concept=squares")))


def test_bad_masks_are_skipped_and_counted(make_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    manifest = _square_dataset(tmp_path / "data", 12, bad=True)
    with caplog.at_level(logging.WARNING):
        res = run_stages(make_cfg(_overrides(manifest, "stage=[extract,dissect]")))["stages"]["dissect"]
    assert res["skipped_masks"] == 2 and "2 concept masks skipped" in caplog.text
    store = Context(make_cfg(_overrides(manifest, "stage=dissect"))).store()
    sq = read_dissection(store, "features.1").set_index(["unit", "concept"])["iou"]
    assert 0.75 < sq[(0, "square")] < 1.0  # the unit still fires on the two images without a mask


def test_errors_name_the_fix(make_cfg, tmp_path: Path) -> None:
    manifest = _square_dataset(tmp_path / "data", 6)
    with pytest.raises(PipelineError, match="stage=extract"):
        run_stages(make_cfg(_overrides(manifest, "stage=dissect")))
    run_stages(make_cfg(_overrides(manifest, "stage=extract")))
    with pytest.raises(PipelineError, match="Did you mean: features.1"):
        run_stages(make_cfg(_overrides(manifest, "stage=dissect", "dissect.layers=[features.11]")))
    with pytest.raises(PipelineError, match="is not in the activation store"):
        run_stages(make_cfg(_overrides(manifest, "stage=dissect", "dissect.layers=[features.0]")))
    with pytest.raises(PipelineError, match="dissect.resolution"):
        run_stages(make_cfg(_overrides(manifest, "stage=dissect", "dissect.resolution=0")))


def test_unit_label_changes() -> None:
    from pipeline.audit.compare import unit_label_changes

    base = pd.DataFrame({"layer": ["a"] * 4 + ["gone"], "unit": [0, 1, 2, 3, 0],
                         "label": ["square", "corner", None, "square", "x"], "concept": ["square", "corner", "x", "square", "x"],
                         "iou": [0.5, 0.1, 0.01, 0.2, 0.3]})
    cur = pd.DataFrame({"layer": ["a"] * 4 + ["new"], "unit": [0, 1, 2, 3, 0],
                        "label": ["square", None, "fragment", "corner", "y"], "concept": ["square", "corner", "fragment", "corner", "y"],
                        "iou": [0.6, 0.02, 0.3, 0.25, 0.3]})
    out = unit_label_changes(cur, base)
    assert out["layers"] == ["a"] and out["changed"] == 2 and out["lost"] == 1
    assert [(r["unit"], r["old_label"], r["label"]) for r in out["changed_list"]] == [(2, None, "fragment"),
                                                                                      (3, "square", "corner")]
    assert out["lost_list"][0]["unit"] == 1 and out["lost_list"][0]["old_label"] == "corner"


def test_audit_lists_units_that_lost_their_concept(make_cfg, tmp_path: Path) -> None:
    manifest = _square_dataset(tmp_path / "data", 12)
    audit = ["audit.reliance.enabled=false", f"audit.snapshots={tmp_path / 'audits'}"]
    first = run_stages(make_cfg(_overrides(manifest, "stage=[extract,dissect,audit]", *audit)))["stages"]["audit"]
    assert first["units_lost_concept"] is None  # nothing to compare with yet
    # at the top 1% only the brightest class-1 squares' value (1.0) is the threshold: nothing lies above it
    again = run_stages(make_cfg(_overrides(manifest, "stage=[dissect,audit]", "dissect.quantile=0.01", *audit)))
    res = again["stages"]["audit"]
    assert res["units_lost_concept"] == 1 and res["units_relabelled"] == 0
    report = json.loads(Path(res["report"]).read_text())["unit_labels"]
    assert report["lost_list"][0]["unit"] == 0 and report["lost_list"][0]["old_label"] == "square"


def test_labels_only_dataset_gets_selectivity_and_no_concepts(make_cfg, tmp_path: Path) -> None:
    manifest = _square_dataset(tmp_path / "data", 12)  # 6 of class 1: the top-6 images
    pd.read_csv(manifest).drop(columns="concepts").to_csv(manifest, index=False)
    run_stages(make_cfg(_overrides(manifest, "stage=[extract,dissect]")))
    store = Context(make_cfg(_overrides(manifest, "stage=dissect"))).store()
    units = read_unit_labels(store, "features.1")
    assert units["label"].tolist() == [None, None] and units["concept"].tolist() == [None, None]
    assert units.loc[0, "purity"] == 1.0 and units.loc[0, "selectivity"] > 0.5
    assert read_dissection(store, "features.1").empty
