"""stage=explain end to end on the tiny built-in setup: artifacts, panels, table, caching per method,
image selection, the CAM localizer conversion, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from pipeline.artifacts import artifact_key, read_artifact, write_artifact
from pipeline.cache import Cache
from pipeline.errors import PipelineError
from pipeline.methods.registry import METHODS
from pipeline.methods.segmentation import Segmentation
from pipeline.pictures import Tile, display_values, overlay, panel
from pipeline.runtime import Context
from pipeline.stages import run_stages
from pipeline.selection import Predictions, input_box, select_images
from tests.helpers import compose_config

FAST = ["explain.metrics.steps=4", "explain.occlusion.stride=16"]
FILES = ("map.npy", "overlay.png", "meta.json", "manifest.json")


@pytest.fixture(scope="module")
def trained_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache with the tiny dataset and both tiny built-in models, made once for this module."""
    root = tmp_path_factory.mktemp("explain_base")
    run_stages(compose_config(root, ["stage=train"]))
    run_stages(compose_config(root, ["stage=train", "model=digits_cnn_fc"]))
    return root / "cache"


@pytest.fixture
def cfg(make_cfg, tmp_path: Path, trained_cache: Path):
    """make_cfg with a private copy of the trained cache (so cache counts are this test's own)."""
    shutil.copytree(trained_cache, tmp_path / "cache")
    return lambda overrides=None: make_cfg(FAST + (overrides or []))


def _explain(cfg, overrides: list[str] | None = None) -> tuple[dict, dict]:
    summary = run_stages(cfg(["stage=explain", *(overrides or [])]))
    return summary["stages"]["explain"], summary["cache"]


def test_explain_writes_artifacts_panels_table_and_metrics(cfg) -> None:
    result, cache = _explain(cfg)
    table = pd.read_parquet(result["table"])
    maps = table[table["key"].notna()]
    assert result["images"] == 10 and result["artifacts_computed"] == 40 and result["artifacts_cached"] == 0
    assert sorted(maps["method"].unique()) == ["cam", "gradcam", "occlusion", "saliency"]
    assert (table["selected_by"] == "misclassified").sum() == 2 * 5  # 4 methods + the centre baseline
    assert (table.loc[table["selected_by"] == "misclassified", "label"]
            != table.loc[table["selected_by"] == "misclassified", "prediction"]).all()
    for row in maps.itertuples():
        folder = Path(row.artifact_dir)
        assert folder.parent.name == row.key[:2] and folder.parent.parent.name == row.method
        assert all((folder / f).is_file() for f in FILES)
        arr = np.load(row.map_path)
        assert arr.dtype == np.float32 and arr.shape == (64, 64)
        assert Image.open(row.overlay_path).size == (64, 64)
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["target"] == row.target == row.prediction and meta["image_id"] == row.image_id
    assert len(list(Path(result["panels"]).glob("*.png"))) == 10
    assert set(maps["panel_path"]) == {str(p) for p in Path(result["panels"]).glob("*.png")}
    assert cache["artifacts/saliency"] == {"hits": 0, "misses": 10}
    metrics = json.loads(Path(result["metrics"]).read_text())
    assert set(metrics["methods"]) == {"saliency", "occlusion", "cam", "gradcam", "center (baseline)"}
    for m in metrics["methods"].values():
        assert m["images"] == 10 and 0 <= m["pointing"] <= 1 and 0 <= m["box_accuracy"] <= 1
        assert 0 <= m["deletion_auc"] <= 1 and 0 <= m["insertion_auc"] <= 1


def test_rerun_hits_and_one_changed_parameter_recomputes_one_method(cfg) -> None:
    _explain(cfg)
    result, cache = _explain(cfg)
    assert result["artifacts_computed"] == 0 and result["artifacts_cached"] == 40
    assert all(v["misses"] == 0 for k, v in cache.items() if k.startswith(("artifacts/", "metrics/")))
    result, cache = _explain(cfg, ["explain.occlusion.window=8", "explain.occlusion.stride=8"])
    assert result["artifacts_computed"] == 10
    assert cache["artifacts/occlusion"] == {"hits": 0, "misses": 10}
    for method in ("saliency", "cam", "gradcam"):
        assert cache[f"artifacts/{method}"] == {"hits": 10, "misses": 0}
    # the exact engines give the same map, so switching between them is a cache hit
    result, _ = _explain(cfg, ["explain.occlusion.window=8", "explain.occlusion.stride=8",
                               "explain.occlusion.engine=plain"])
    assert result["artifacts_computed"] == 0
    # another colormap redraws every overlay, but the scores of the unchanged maps are kept
    result, cache = _explain(cfg, ["explain.overlay.cmap=viridis"])
    assert result["artifacts_computed"] == 40
    assert all(v["misses"] == 0 for k, v in cache.items() if k.startswith("metrics/"))


def test_smoothgrad_segmentation_and_the_label_as_target(cfg) -> None:
    result, cache = _explain(cfg, ["explain.methods=[smoothgrad,segmentation]", "explain.smoothgrad.samples=2",
                                   "explain.target=label", "explain.select.misclassified=2",
                                   "explain.select.random=0"])
    table = pd.read_parquet(result["table"])
    maps = table[table["key"].notna()]
    assert sorted(maps["method"].unique()) == ["segmentation", "smoothgrad"]
    assert (maps["target"] == maps["label"]).all() and (maps["target"] != maps["prediction"]).all()
    assert cache["artifacts/segmentation"]["misses"] == 2
    mask = np.load(maps.loc[maps["method"] == "segmentation", "map_path"].iloc[0])
    assert set(np.unique(mask)) <= {0.0, 1.0} and mask.any()
    # the stored mask is the method's mask of that image, seeded by its saliency map
    ctx = Context(cfg(["explain.target=label"]))
    row = maps[maps["method"] == "segmentation"].iloc[0]
    x = ctx.model.transform(Image.open(row.path).convert("RGB"))[None]
    again = Segmentation().attribute(ctx.model.module.eval(), x, int(row.target)).maps[0].numpy()
    np.testing.assert_array_equal(again, mask)
    seg = maps[maps["method"] == "segmentation"]
    assert seg["box_iou"].notna().all() and seg["pointing_hit"].isna().all()  # a mask has a box, not a peak


def _select(cfg, overrides: list[str]) -> list:
    ctx = Context(cfg(overrides))
    return select_images(ctx, ctx.cfg.explain.select, Predictions(ctx, 64))


def test_selection_by_ids_paths_class_misclassified_and_random(cfg) -> None:
    ctx = Context(cfg())
    recs = ctx.dataset.records
    test = recs[recs["split"] == "test"]
    names = recs["path"].map(lambda p: Path(p).name)
    a = test[names[test.index].map(names.value_counts()) == 1].iloc[0]  # a file name found once
    b, c = test[test["image_id"] != a.image_id].iloc[0], test[test["image_id"] != a.image_id].iloc[1]
    items = _select(cfg, [f"explain.select.ids=[{a.image_id},{b.image_id[:10]}]",
                          f"explain.select.paths=[{c.path},{Path(a.path).name}]"])
    assert [it.image_id for it in items] == [a.image_id, b.image_id, c.image_id]  # deduplicated, no extras
    assert [it.reason for it in items] == ["id", "id", "path"]
    items = _select(cfg, ["explain.select.classes=[3]", "explain.select.per_class=2"])
    assert len(items) == 2 and all(it.label == 3 and it.split == "test" for it in items)
    items = _select(cfg, ["explain.select.misclassified=3", "explain.select.random=0"])
    preds = Predictions(ctx, 64)
    assert len(items) == 3 and all(p != it.label for p, it in zip(preds.predicted(items), items))
    one = [it.image_id for it in _select(cfg, ["explain.select.random=5", "explain.select.misclassified=0"])]
    two = [it.image_id for it in _select(cfg, ["explain.select.random=5", "explain.select.misclassified=0"])]
    other = [it.image_id for it in _select(cfg, ["explain.select.random=5", "explain.select.misclassified=0",
                                                 "explain.select.seed=1"])]
    assert one == two and one != other and len(set(one)) == 5
    assert set(one) <= set(test["image_id"])
    assert len(_select(cfg, ["explain.select.random=5", "explain.select.split=train",
                             "explain.select.misclassified=0", "explain.select.limit=3"])) == 3


def test_selection_by_store_query(cfg) -> None:
    with pytest.raises(PipelineError, match="stage=extract"):
        _select(cfg, ["explain.select.query.layer=features.relu4", "explain.select.query.channel=5"])
    run_stages(cfg(["stage=extract"]))
    ctx = Context(cfg())
    want = ctx.store().topk("features.relu4", 5, k=3, by="mean")["image_id"].tolist()
    items = _select(cfg, ["explain.select.query.layer=features.relu4", "explain.select.query.channel=5",
                          "explain.select.query.k=3", "explain.select.query.by=mean"])
    assert [it.image_id for it in items] == want
    assert items[0].reason == "top1 features.relu4:5"


def test_images_not_found_lists_what_was_asked(cfg) -> None:
    with pytest.raises(PipelineError, match=r"images not found: id deadbeefdeadbeef.*path /no/such/file.png"):
        _select(cfg, ["explain.select.ids=[deadbeefdeadbeef]", "explain.select.paths=[/no/such/file.png]"])
    names = Context(cfg()).dataset.records["path"].map(lambda p: Path(p).name)
    twice = names[names.duplicated()].iloc[0]  # indexes restart per split, so train and test share names
    with pytest.raises(PipelineError, match=rf"path {twice} \(the name matches 2 images; give the full path\)"):
        _select(cfg, [f"explain.select.paths=[{twice}]"])


def test_unlabelled_photos_and_a_file_outside_the_dataset(cfg, tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(outside)
    result, _ = _explain(cfg, ["data=photos", "data.names=[chelsea,coffee]", "explain.methods=[saliency,gradcam]",
                               f"explain.select.paths=[chelsea,{outside}]"])
    table = pd.read_parquet(result["table"])
    assert result["images"] == 2 and len(table) == 4 and table["label"].isna().all()
    assert table["box_iou"].isna().all() and "quality" not in result
    assert {Path(p).name for p in table["path"]} == {"chelsea.png", "outside.png"}


def test_cam_conversion_on_a_flatten_fc_model(cfg, tmp_path: Path) -> None:
    over = ["model=digits_cnn_fc", "explain.methods=[cam]", "explain.select.random=2",
            "explain.select.misclassified=0", "explain.cam.fit.epochs=20"]
    result, cache = _explain(cfg, over)
    conv = result["cam_conversion"]
    assert conv["layer"] == "features.relu4" and not conv["cached"] and conv["features_from"] == "forward pass"
    assert 0 <= conv["converted_accuracy"] <= 1 and result["original_accuracy"] == round(conv["original_accuracy"], 4)
    assert (Path(conv["folder"]) / "head.pt").is_file() and Path(conv["folder"]).parent.name == "models"
    metrics = json.loads(Path(result["metrics"]).read_text())
    assert metrics["conversions"]["cam"]["converted_accuracy"] == conv["converted_accuracy"]
    table = pd.read_parquet(result["table"])
    meta = json.loads((Path(table["artifact_dir"].dropna().iloc[0]) / "meta.json").read_text())
    assert meta["converted"] and meta["layer"] == "features.relu4"
    again, _ = _explain(cfg, over)
    assert again["cam_conversion"]["cached"] and again["artifacts_computed"] == 0
    with pytest.raises(PipelineError, match="convert=auto"):
        _explain(cfg, over + ["explain.cam.convert=never"])


def test_cam_conversion_reads_pooled_features_from_the_store(cfg) -> None:
    run_stages(cfg(["stage=extract", "model=digits_cnn_fc", "extract.layers=[features.relu4]"]))
    result, _ = _explain(cfg, ["model=digits_cnn_fc", "explain.methods=[cam]", "explain.select.random=1",
                               "explain.select.misclassified=0", "explain.cam.fit.epochs=20"])
    assert result["cam_conversion"]["features_from"] == "store"


@pytest.mark.parametrize("overrides, match", [
    (["explain.target=10"], r"class 10 is out of range.*0\.\.9"),
    (["explain.target=banana"], "explain.target=banana is not valid"),
    (["explain.gradcam.layer=fc"], "Grad-CAM needs a convolutional layer"),
    (["explain.cam.layer=flatten"], "CAM needs a convolutional layer"),
    (["explain.cam.layer=features.conv3", "explain.cam.convert=never"], "not the layer the model's GAP head reads"),
    (["explain.methods=[saliency,lime]"], "unknown explain method 'lime'"),
    (["explain.occlusion.engine=fast"], "engine=fast is not valid"),
    (["explain.overlay.cmap=jett"], "not a matplotlib colormap. Did you mean: jet"),
])
def test_clear_errors(cfg, overrides: list[str], match: str) -> None:
    with pytest.raises(PipelineError, match=match):
        _explain(cfg, ["explain.select.random=1", "explain.select.misclassified=0", *overrides])


def test_artifact_round_trip_overlay_and_panel(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    image = np.full((6, 8, 3), 100, np.uint8)
    raw = np.zeros((6, 8), np.float32)
    raw[2, 3], raw[0, 0] = 4.0, -2.0
    key = artifact_key("saliency", 1, {"target": 1}, "model", "image")
    assert key != artifact_key("saliency", 1, {"target": 2}, "model", "image")
    assert read_artifact(cache, "saliency", key) is None
    written = write_artifact(cache, "saliency", key, raw, image, {"note": "x"}, {"grad": raw * 2})
    back = read_artifact(cache, "saliency", key)
    assert back.cached and not written.cached and back.folder == tmp_path / "artifacts/saliency" / key[:2] / key
    np.testing.assert_array_equal(back.map, raw)
    np.testing.assert_array_equal(back.extra("grad"), raw * 2)
    assert back.meta["note"] == "x" and back.meta["max"] == 4.0
    assert cache.summary()["artifacts/saliency"] == {"hits": 1, "misses": 1}
    np.testing.assert_allclose(display_values(raw)[2, 3], 1.0)
    assert display_values(raw)[0, 0] == 0
    ov = np.asarray(overlay(image, raw, "jet", 0.5))
    assert (ov[0, 1] == 100).all() and not (ov[2, 3] == 100).all()  # colour only where the map is positive
    tiles = [Tile("input", Image.fromarray(image)), Tile("saliency", Image.fromarray(ov), [("white", (1, 1, 4, 4))])]
    pic = panel(tiles, "header", tile_size=64)
    assert pic.width == 6 + 2 * (64 + 6) and pic.height > 48


def test_input_box_follows_resize_and_centre_crop() -> None:
    tf = T.Compose([T.Resize(100), T.CenterCrop(80), T.ToTensor(), T.Normalize((0.5,), (0.5,))])
    # a 200x400 (w x h) image becomes 100x200, then the crop keeps rows 60..140 and columns 10..90
    assert input_box((20, 120, 180, 280), (200, 400), tf, (80, 80)) == (0.0, 0.0, 80.0, 80.0)
    assert input_box((40, 140, 60, 160), (200, 400), tf, (80, 80)) == (10.0, 10.0, 20.0, 20.0)
    assert input_box((0, 0, 10, 10), (200, 400), tf, (80, 80)) is None  # cropped away
    assert input_box((1, 2, 3, 4), (5, 5), T.Compose([T.RandomRotation(5)]), (5, 5)) is None
    assert input_box((1, 2, 3, 4), (5, 5), lambda im: torch.zeros(1, 5, 5), (5, 5)) == (1.0, 2.0, 3.0, 4.0)


def test_methods_stage_lists_every_method_and_whether_it_applies(cfg) -> None:
    summary = run_stages(cfg(["stage=methods", "model=digits_cnn_fc"]))["stages"]["methods"]
    table = pd.read_csv(summary["table"]).set_index("method")
    assert list(table.index) == list(METHODS) and summary["methods"] == len(METHODS)
    assert table.loc["gradcam", "applies"] == "yes" and table.loc["gradcam", "settings"] == "layer=features.relu4"
    assert table.loc["cam", "applies"].startswith("no: ") and "GAP localizer" in table.loc["cam", "applies"]
    assert summary["applicable"] == len(METHODS) - 1


def test_batching_does_not_change_the_maps(cfg, tmp_path: Path) -> None:
    over = ["explain.methods=[saliency,smoothgrad,gradcam,rise]", "explain.smoothgrad.samples=3",
            "explain.rise.masks=32", "explain.metrics.enabled=false"]
    one, _ = _explain(cfg, [*over, "explain.images_per_call=1"])
    first = pd.read_parquet(one["table"])
    maps = {(r.image_id, r.method): np.load(r.map_path) for r in first.itertuples()}
    shutil.rmtree(tmp_path / "cache" / "artifacts")
    many, cache = _explain(cfg, [*over, "explain.images_per_call=7"])
    assert many["artifacts_computed"] == len(maps) and cache["artifacts/rise"]["misses"] == 10
    for r in pd.read_parquet(many["table"]).itertuples():
        np.testing.assert_allclose(np.load(r.map_path), maps[(r.image_id, r.method)], rtol=1e-4, atol=1e-6)
    with pytest.raises(PipelineError, match="images_per_call=0 is not valid"):
        _explain(cfg, ["explain.images_per_call=0"])


def test_a_method_failing_on_one_image_names_it_and_keeps_the_rest(cfg, monkeypatch) -> None:
    from pipeline.methods.saliency import Saliency

    real, calls = Saliency.attribute, []

    def flaky(self, model, x, target):
        calls.append(x.shape[0])
        if x.shape[0] > 1 or len(calls) == 4:  # the batch, then the third image alone
            raise RuntimeError("boom")
        return real(self, model, x, target)

    monkeypatch.setattr(Saliency, "attribute", flaky)
    over = ["explain.methods=[saliency]", "explain.metrics.enabled=false", "explain.images_per_call=5"]
    with pytest.raises(PipelineError, match=r"saliency failed on image .*\.png \(id [0-9a-f]{12}\): RuntimeError: boom"
                                            r".*Every artifact computed before it is cached"):
        _explain(cfg, over)
    monkeypatch.setattr(Saliency, "attribute", real)
    result, cache = _explain(cfg, over)
    assert cache["artifacts/saliency"] == {"hits": 2, "misses": 8} and result["artifacts_cached"] == 2
