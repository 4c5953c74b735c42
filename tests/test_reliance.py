"""Is the model looking at the object? Whole-split explain, per-class reliance, strategies, audit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.audit import compare, snapshot
from pipeline.errors import PipelineError
from pipeline.methods.metrics import box_masks, inside_energy, pointing_mask
from pipeline.reliance.robust import far_from_others
from pipeline.reliance.summary import Rules, class_table, drift, spearman_rows
from pipeline.runtime import Context
from pipeline.stages import audit as audit_stage
from pipeline.stages import explain as explain_stage
from pipeline.store.maps import MapStore, decode_maps, decode_object, encode_maps, encode_objects

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
CORNER = (0, 0, 6, 6)                                        # the "watermark" square, outside every object
REGIONS = [(4, 18, 14, 28), (18, 4, 28, 14), (18, 18, 28, 28), (10, 10, 20, 20)]  # class c's object box


class RegionModel(nn.Module):
    """Hand-set weights: class c's logit sums the pixels of its region. ``corner_class`` reads the
    corner square instead (looks away from its object); ``mixed_class`` reads its object plus a
    strongly weighted corner switched on only when the corner is bright (a second strategy)."""

    def __init__(self, corner_class: int | None = None, mixed_class: int | None = None) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 1, 1)          # the identity: a layer for stage=extract to store
        with torch.no_grad():
            self.stem.weight.fill_(1.0)
            self.stem.bias.zero_()
        w = torch.zeros(len(REGIONS), 1, SIZE, SIZE)
        for c, (x0, y0, x1, y1) in enumerate(REGIONS):
            w[c, 0, y0:y1, x0:x1] = 1.0 / ((x1 - x0) * (y1 - y0))
        corner = torch.zeros(1, SIZE, SIZE)
        corner[0, CORNER[1]:CORNER[3], CORNER[0]:CORNER[2]] = 1.0 / 36
        if corner_class is not None:
            w[corner_class] = corner
        self.register_buffer("w", w)
        self.register_buffer("corner", corner)
        self.register_buffer("mixed", torch.zeros(len(REGIONS)) if mixed_class is None else
                             torch.nn.functional.one_hot(torch.tensor(mixed_class), len(REGIONS)).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        logits = (x[:, None] * self.w[None]).flatten(2).sum(-1) * 10
        gate = torch.relu((x * self.corner).flatten(1).sum(-1) - 0.5) * 80
        return logits + gate[:, None] * self.mixed[None]


def _image(rng: np.random.Generator, c: int, corner: bool) -> np.ndarray:
    img = rng.uniform(0, 0.1, (SIZE, SIZE))
    x0, y0, x1, y1 = REGIONS[c]
    img[y0:y1, x0:x1] = 0.9
    if corner:
        img[CORNER[1]:CORNER[3], CORNER[0]:CORNER[2]] = 1.0
    return (img * 255).astype(np.uint8)


def _dataset(root: Path, per_class: int, corner: dict[int, int], boxes: bool, masks: bool = False) -> Path:
    """A manifest of PNGs: ``per_class`` images of each class, the first ``corner[c]`` of class c
    with the watermark; with object boxes (and mask PNGs) when asked."""
    rng = np.random.default_rng(0)
    rows = []
    (root / "img").mkdir(parents=True, exist_ok=True)
    for c in range(len(REGIONS)):
        for i in range(per_class):
            p = root / "img" / f"c{c}_{i}.png"
            Image.fromarray(_image(rng, c, i < corner.get(c, 0)), "L").save(p)
            row = {"path": str(p), "label": c, "split": "test"}
            if boxes:
                row.update(zip(("box_x0", "box_y0", "box_x1", "box_y1"), REGIONS[c]))
            if masks:
                m = np.zeros((SIZE, SIZE), np.uint8)
                x0, y0, x1, y1 = REGIONS[c]
                m[y0:y1, x0:x1] = 255
                Image.fromarray(m, "L").save(root / "img" / f"c{c}_{i}_mask.png")
                row["mask"] = str(root / "img" / f"c{c}_{i}_mask.png")
            rows.append(row)
    path = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _scripted(tmp: Path, **kw) -> Path:
    path = tmp / "region_model.pt"
    torch.jit.trace(RegionModel(**kw).eval(), torch.zeros(1, 1, SIZE, SIZE)).save(str(path))
    return path


def _overrides(manifest: Path, model: Path, extra: list[str] | None = None) -> list[str]:
    return ["data=manifest", f"data.path={manifest}", "model=torchscript", f"model.path={model}",
            "model.channels=1", f"model.image_size={SIZE}", "model.mean=[0.0]", "model.std=[1.0]",
            "explain.methods=[saliency]", "explain.select.all=true", "explain.select.split=test",
            *(extra or [])]


# --------------------------------------------------------------------------------- pure maths ---

def test_object_scores_on_boxes_and_masks() -> None:
    masks = box_masks(torch.tensor([[1.0, 1.0, 3.0, 4.0], [0.6, 0.0, 1.6, 1.0]]), 5, 5)
    assert masks[0].sum() == 6 and masks[0, 1:4, 1:3].all()
    assert masks[1].sum() == 1 and masks[1, 0, 1]  # pixel centres decide fractional edges
    maps = torch.zeros(2, 5, 5)
    maps[0, 2, 2], maps[0, 0, 4], maps[0, 4, 4] = 2.0, 1.0, -5.0   # negative attribution is not energy
    maps[1, 4, 4] = 1.0  # far from pixel (1, 0)
    e = inside_energy(maps, masks)
    assert e[0].item() == pytest.approx(2 / 3) and e[1].item() == 0.0
    assert torch.isnan(inside_energy(torch.zeros(1, 5, 5), masks[:1]))[0]
    assert pointing_mask(maps, masks, tolerance=0).tolist() == [True, False]
    assert pointing_mask(maps[1:], masks[1:], tolerance=4).tolist() == [True]


def test_robust_rule_flags_the_class_far_below_the_others() -> None:
    flagged, limits = far_from_others(np.array([0.82, 0.78, 0.80, 0.15, 0.79, np.nan]), k=3, min_gap=0.1)
    assert flagged.tolist() == [False, False, False, True, False, False]
    assert limits[3] == pytest.approx(0.79 - 0.1, abs=0.02)
    assert not far_from_others(np.array([0.5, 0.1]), 3, 0.1)[0].any()  # too few classes to compare with
    assert far_from_others(np.array([0.1, 0.1, 0.1, 0.9]), 3, 0.1, "above")[0].tolist() == [False] * 3 + [True]


def test_class_table_and_drift() -> None:
    scores = pd.DataFrame({"image_id": [f"i{i}" for i in range(12)], "class": [0] * 6 + [1] * 6, "method": "m",
                           "inside_energy": [0.9, 0.8, 0.2, 0.7, 0.9, np.nan] + [0.1] * 6,
                           "pointing_hit": [1.0] * 6 + [0.0] * 6, "box_iou": 0.5, "deletion_auc": np.nan,
                           "insertion_auc": np.nan})
    table = class_table(scores, ["zero", "one"], Rules())
    row = table.set_index("class").loc[0]
    assert row["images"] == 6 and row["with_object"] == 5
    assert row["inside_energy"] == pytest.approx(0.7) and row["outside_fraction"] == pytest.approx(0.2)
    a = np.arange(12, dtype=float).reshape(3, 4)
    assert np.allclose(spearman_rows(a, a * 2 + 1)[:2], 1) and np.allclose(spearman_rows(a, -a), -1)
    assert np.isnan(spearman_rows(np.ones((1, 4)), a[:1]))[0]
    now = pd.DataFrame({"image_id": ["a", "b"], "method": "m", "class": [0, 0], "thumb": [a[0], a[1]]})
    then = pd.DataFrame({"image_id": ["a", "b", "c"], "method": "m", "thumb": [a[0], -a[1], a[2]]})
    d = drift(now, then, ["zero"])
    assert d.loc[0, "images"] == 2 and d.loc[0, "map_correlation"] == pytest.approx(0.0)


def test_map_store_parts_keep_the_newest_row(tmp_path: Path) -> None:
    store = MapStore(tmp_path, "m", "k" * 64, 8)
    maps = torch.rand(3, 4, 5)
    obj = torch.zeros(3, 4, 5, dtype=torch.bool)
    obj[1, 1:3, 2:4] = True
    rows = pd.DataFrame({"row_key": ["a", "b", "c"], "image_id": ["x", "y", "z"], "target": [0, 1, 2],
                         "map": encode_maps(maps), "object": encode_objects(obj, (4, 5), 3), "h": 4, "w": 5})
    store.write(rows)
    store.write(rows.iloc[:1].assign(target=7))
    assert sorted(store.index()["row_key"]) == ["a", "b", "c"]
    got = store.read(["a", "b"]).set_index("row_key")
    assert got.loc["a", "target"] == 7 and got.loc["b", "target"] == 1
    back = decode_maps([got.loc["b", "map"]], [4], [5])[0]
    assert np.allclose(back, maps[1].numpy(), atol=1e-3)
    assert (decode_object(got.loc["b", "object"], 4, 5) == obj[1].numpy()).all()
    assert decode_object(got.loc["a", "object"], 4, 5) is not None and not decode_object(
        got.loc["a", "object"], 4, 5).any()
    assert not list(tmp_path.rglob("*.tmp"))


# ----------------------------------------------------------------------------- the stage ---

def test_a_corner_model_is_flagged_on_boxed_data_and_an_object_model_is_not(make_cfg, tmp_path: Path) -> None:
    manifest = _dataset(tmp_path / "data", 6, {0: 6}, boxes=True)
    cfg = make_cfg(_overrides(manifest, _scripted(tmp_path, corner_class=0)))
    out = explain_stage.run(Context(cfg))
    assert out["images"] == 24 and out["maps_computed"] == 24 and out["flagged_classes"] == ["0"]
    rel = json.loads(Path(out["reliance"]).read_text())
    rows = {r["class_name"]: r for r in rel["per_class"]}
    assert rows["0"]["inside_energy"] < 0.05 and rows["0"]["outside_fraction"] == 1.0 and rows["0"]["flagged"]
    assert all(rows[c]["inside_energy"] > 0.95 and not rows[c]["flagged"] for c in ("1", "2", "3"))
    assert "below" in rows["0"]["reason"] and Path(rows["0"]["figures"]["worst"]).is_file()
    assert Path(rows["0"]["figures"]["outside_mean"]).is_file()
    scores = pd.read_parquet(out["scores"])
    assert len(scores) == 24 and scores["object"].eq("box").all()
    # A re-run computes nothing; an object-looking model (another key) is not flagged.
    again = explain_stage.run(Context(cfg))
    assert again["maps_computed"] == 0 and again["maps_cached"] == 24 and again["flagged_classes"] == ["0"]
    (tmp_path / "clean").mkdir()
    cfg2 = make_cfg(_overrides(manifest, _scripted(tmp_path / "clean")))
    clean = explain_stage.run(Context(cfg2))
    assert clean["maps_computed"] == 24 and clean["flagged_classes"] == []


def test_masks_are_used_where_present_and_bad_masks_are_listed(make_cfg, tmp_path: Path) -> None:
    manifest = _dataset(tmp_path / "data", 5, {}, boxes=True, masks=True)
    table = pd.read_csv(manifest)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(table.loc[0, "mask"])   # another size
    table.loc[1, "mask"] = str(tmp_path / "missing.png")
    table.loc[2, ["box_x0", "box_x1"]] = [-40.0, -10.0]                      # a box outside the image
    table.to_csv(manifest, index=False)
    cfg = make_cfg(_overrides(manifest, _scripted(tmp_path)))
    out = explain_stage.run(Context(cfg))
    scores = pd.read_parquet(out["scores"]).set_index("path")
    paths = table["path"].tolist()
    assert scores.loc[paths[0], "object"] == "box" and scores.loc[paths[1], "object"] == "box"
    assert scores.loc[paths[2], "object"] == "mask" and scores.loc[paths[3], "object"] == "mask"
    assert out["object_problems"] == 3
    problems = json.loads((Path(out["scores"]).parent / "object_problems.json").read_text())
    assert {Path(p["path"]).name for p in problems} == {Path(p).name for p in paths[:3]}


def test_an_empty_split_is_a_one_line_error(make_cfg, tmp_path: Path) -> None:
    manifest = _dataset(tmp_path / "data", 2, {}, boxes=True)
    cfg = make_cfg(_overrides(manifest, _scripted(tmp_path), ["explain.select.split=val"]))
    with pytest.raises(PipelineError, match="split 'val' has no images.*its splits are test"):
        explain_stage.run(Context(cfg))


def test_a_second_strategy_is_found_without_boxes(make_cfg, tmp_path: Path) -> None:
    manifest = _dataset(tmp_path / "data", 24, {0: 8}, boxes=False)
    cfg = make_cfg(_overrides(manifest, _scripted(tmp_path, mixed_class=0)))
    out = explain_stage.run(Context(cfg))
    rel = json.loads(Path(out["reliance"]).read_text())
    rows = {r["class_name"]: r for r in rel["per_class"]}
    assert sorted(rows["0"]["clusters"]) == [8, 16] and rows["0"]["flagged"]
    assert "second strategy" in rows["0"]["reason"] and rows["0"]["inside_energy"] is None
    assert out["flagged_classes"] == ["0"]
    assert all(not rows[c]["flagged"] for c in ("1", "2", "3"))


def test_shards_write_the_map_store_and_the_audit_reads_them(make_cfg, tmp_path: Path) -> None:
    manifest = _dataset(tmp_path / "data", 6, {0: 6}, boxes=True)
    model = _scripted(tmp_path, corner_class=0)
    done = 0
    for shard in (0, 1):
        out = explain_stage.run(Context(make_cfg(_overrides(manifest, model, [f"shard={shard}", "num_shards=2"]))))
        assert "reliance" not in out and "shard" in out["note"]
        done += out["maps_computed"]
    assert done == 24
    whole = explain_stage.run(Context(make_cfg(_overrides(manifest, model))))
    assert whole["maps_computed"] == 0 and whole["flagged_classes"] == ["0"]


def test_audit_reliance_section_snapshots_drift_and_fails_on_flagged_classes(make_cfg, tmp_path: Path) -> None:
    manifest = _dataset(tmp_path / "data", 6, {0: 6}, boxes=True)
    cfg = make_cfg(_overrides(manifest, _scripted(tmp_path, corner_class=0),
                              ["audit.reliance.methods=[saliency]", "audit.fail_on.max_flagged_classes=0"]))
    ctx = Context(cfg)
    section, values, thumbs = audit_stage.reliance_section(ctx, cfg.audit, None, tmp_path / "audit", 50)
    assert section["flagged_classes"] == ["0"] and section["maps_computed"] == 24 and values["flagged_classes"] == 1
    checks = compare.evaluate(values, audit_stage._config_checks(cfg.audit))
    assert [c["check"] for c in checks if c["failed"]] == ["flagged_classes"]
    assert len(thumbs) == 24 and thumbs["thumb"].iloc[0].shape == (256,)
    manifest_json = {"reliance": {"per_class": section["per_class"]}}
    frame = pd.DataFrame({"image_id": [], "path": [], "label": [], "split": [], "prediction": [], "confidence": []})
    neurons = pd.DataFrame({"layer": [], "channel": [], "max": [], "top": []})
    snap = snapshot.load(snapshot.save(tmp_path / "snaps", {**manifest_json, "accepted": True}, frame, neurons, None,
                                       thumbs))
    again, values2, _ = audit_stage.reliance_section(ctx, cfg.audit, snap, tmp_path / "audit", 50)
    assert again["maps_computed"] == 0 and again["energy_drops"] == [] and values2["inside_energy_drop"] == 0.0
    assert {r["class_name"] for r in again["drift"]} == {"0", "1", "2", "3"}
    assert all(r["map_correlation"] == pytest.approx(1.0) for r in again["drift"])


@pytest.mark.slow
def test_the_audit_command_exits_1_when_a_class_looks_away_from_its_object(tmp_path: Path) -> None:
    """audit.fail_on.max_flagged_classes through the real command line, on an exported model."""
    manifest = _dataset(tmp_path / "data", 6, {0: 6}, boxes=True)
    program = torch.export.export(RegionModel(corner_class=0).eval(), (torch.zeros(2, 1, SIZE, SIZE),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "region.pt2")
    cmd = [sys.executable, "-m", "pipeline", "stage=[extract,index,audit]", "data=manifest", f"data.path={manifest}",
           "model=exported", f"model.path={tmp_path / 'region.pt2'}", "model.mean=[0.0]", "model.std=[1.0]",
           "audit.reliance.methods=[saliency]", "audit.reliance.split=test", "explain.causal.enabled=false",
           "progress=false", "device=cpu", f"paths.outputs={tmp_path / 'out'}"]
    failed = subprocess.run([*cmd, "audit.fail_on.max_flagged_classes=0"], capture_output=True, text=True,
                            timeout=600, cwd=ROOT)
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "audit failed: 1 classes look away from their objects" in failed.stderr.strip().splitlines()[-1]
    passed = subprocess.run([*cmd, "audit.fail_on.max_flagged_classes=1"], capture_output=True, text=True,
                            timeout=600, cwd=ROOT)
    assert passed.returncode == 0, passed.stderr[-3000:]


def test_causal_variants_flag_the_corner_class_and_are_cached(make_cfg, tmp_path: Path) -> None:
    manifest = _dataset(tmp_path / "data", 6, {0: 6}, boxes=True)
    cfg = make_cfg(_overrides(manifest, _scripted(tmp_path, corner_class=0), ["explain.causal.fill=constant"]))
    out = explain_stage.run(Context(cfg))
    rel = json.loads(Path(out["reliance"]).read_text())
    rows = {r["class_name"]: r for r in rel["causal"]}
    assert rows["0"]["object_only_retention"] == 0.0 and rows["0"]["context_only_retention"] == 1.0
    assert rows["0"]["flagged"] and "object_only retention" in rows["0"]["reason"]
    assert all(rows[c]["object_only_retention"] == 1.0 and rows[c]["context_only_retention"] == 0.0
               and not rows[c]["flagged"] for c in ("1", "2", "3"))
    # pasted at its own place on a same-class context the object still wins; on a class-0 context the
    # watermark there outvotes it, which is what mixed_rand (and bg_gap) are for
    assert rows["1"]["mixed_same"] == 1.0 and rows["(all)"]["images"] == 24
    assert rows["0"]["mixed_same"] == 1.0 and rows["0"]["mixed_rand"] == 0.0 and rows["0"]["bg_gap"] == 1.0
    assert all(Path(rows[c]["figure"]).is_file() for c in "0123") and rel["causal_check"]["fill"] == "constant"
    again = explain_stage.run(Context(cfg))
    assert again["flagged_classes"] == ["0"]
    stored = list((tmp_path / "cache" / "causal" / "constant").glob("*/part-*.parquet"))
    assert len(stored) == 1  # the re-run predicted nothing new


def test_no_boxes_means_no_causal_rows_and_a_reason(make_cfg, tmp_path: Path) -> None:
    manifest = _dataset(tmp_path / "data", 2, {}, boxes=False)
    out = explain_stage.run(Context(make_cfg(_overrides(manifest, _scripted(tmp_path)))))
    rel = json.loads(Path(out["reliance"]).read_text())
    assert rel["causal"] == [] and "no labelled image has a box or mask" in rel["causal_check"]["note"]


def test_masks_and_boxes_follow_resize_and_centre_crop(tmp_path: Path) -> None:
    from torchvision import transforms as T

    from pipeline.selection import input_box, input_mask

    m = np.zeros((40, 80), np.uint8)   # an 80x40 image, object at x 50..70, y 10..30
    m[10:30, 50:70] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    t = T.Compose([T.Resize(20), T.CenterCrop(20), T.ToTensor()])   # 80x40 -> 40x20 -> crop x 10..30
    mask = input_mask(str(tmp_path / "m.png"), (80, 40), t, (20, 20))
    ys, xs = np.nonzero(mask.numpy())
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (15, 20, 5, 15)   # clipped by the crop at 20
    assert input_box((50, 10, 70, 30), (80, 40), t, (20, 20)) == (15.0, 5.0, 20.0, 15.0)
    with pytest.raises(ValueError, match="is 80x40 but its image is 60x40"):
        input_mask(str(tmp_path / "m.png"), (60, 40), t, (20, 20))
