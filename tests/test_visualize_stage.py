"""stage=visualize end to end on the tiny digits setup: pictures and grids written as cached
artifacts, re-runs served from the cache, channel selection (list, range, most active), the
no-store fallback, clear errors, and (slow) the digits class-visualisation check."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.ascent_pictures import pre_activation
from pipeline.errors import PipelineError
from pipeline.methods.hooks import truncated_forward
from pipeline.models.bundle import imagenet_classes
from pipeline.data.images import images_to_tensor
from pipeline.runtime import Context
from pipeline.stages import run_stages
from pipeline.models.digits import DigitsCNN
from pipeline.models.efficientnet_lite import EfficientNetLite
from pipeline.stages.visualize import parse_channels, resolve_classes
from tests.helpers import compose_config

FAST = ["stage=visualize", "visualize.ascent.steps=4", "visualize.top=4", "visualize.n_most_active=2"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache with the tiny trained digits model and its activation store (stage=extract)."""
    root = tmp_path_factory.mktemp("visualize_shared")
    run_stages(compose_config(root, ["stage=extract"]))
    return root / "cache"


def visualize(make_cfg, shared: Path, *overrides: str) -> dict:
    summary = run_stages(make_cfg([f"paths.cache={shared}", *FAST, *overrides]))
    return summary["stages"]["visualize"] | {"cache": summary["cache"]}


def test_pictures_grids_index_and_cache_hits(make_cfg, shared: Path) -> None:
    unique = ["visualize.ascent.lr=0.0501", "visualize.deconv.patch_min_size=65"]  # fresh keys for this test
    first = visualize(make_cfg, shared, *unique)
    assert first["layer"] == "features.relu4" and first["source"] == "store"
    assert first["deconv_mode"] == "explicit"
    assert first["projection"] == ["deconvnet", "guided_backprop"]      # digits have max-pool switches
    assert first["pictures"] == 2 + 2 * 2 * 4 + 10 and first["computed"] == first["pictures"]
    index = pd.read_parquet(first["index"])
    assert index["kind"].value_counts().to_dict() == {"class": 10, "deconv": 8, "guided": 8, "ascent": 2}
    assert sorted(index.loc[index.kind == "class", "class_index"]) == list(range(10))
    deconv = index[index.kind == "deconv"]
    assert deconv["image_id"].notna().all() and sorted(deconv["rank"].unique()) == [0, 1, 2, 3]
    for col in ("png", "patch_png", "grid"):
        for p in index[col].dropna().unique():
            with Image.open(p) as im:
                assert im.format == "PNG" and min(im.size) >= 26
    # Artifact layout: cache/artifacts/<method>/<key[:2]>/<key>/ with map, picture, meta, manifest.
    for row in index.itertuples():
        method = {"ascent": "ascent", "class": "class_ascent", "deconv": "deconv", "guided": "guided"}[row.kind]
        folder = shared / "artifacts" / method / row.key[:2] / row.key
        assert {"map.npy", "overlay.png", "meta.json", "manifest.json"} <= {p.name for p in folder.iterdir()}
    field = first["receptive_field"]
    factor = math.ceil(65 / max(field))                  # enlarged (nearest) to at least 65 pixels
    assert field == [18, 18] and factor == 4                # relu4 sees 18x18 pixels
    with Image.open(deconv["patch_png"].iloc[0]) as im:
        assert im.size == (field[1] * factor, field[0] * factor)

    again = visualize(make_cfg, shared, *unique)
    assert again["computed"] == 0 and again["cached"] == again["pictures"]
    assert all(v["misses"] == 0 for k, v in again["cache"].items() if k.startswith("artifacts/"))
    assert again["class_confidence"] == first["class_confidence"]
    assert pd.read_parquet(again["index"])["png"].tolist() == index["png"].tolist()


def test_most_active_channels_match_a_direct_forward_pass(make_cfg, shared: Path) -> None:
    result = visualize(make_cfg, shared, "visualize.n_most_active=3", "visualize.classes=[]",
                       "visualize.all_classes_up_to=0")
    ctx = Context(make_cfg([f"paths.cache={shared}"]))
    paths = ctx.store().images()["path"].tolist()
    with torch.no_grad():
        act = truncated_forward(ctx.model.module, images_to_tensor(paths, ctx.model.transform),
                                ["features.relu4"])["features.relu4"]
    means = act.mean(dim=(2, 3)).double().mean(0).numpy()
    assert result["channels"] == [int(c) for c in np.argsort(-means)[:3]]
    assert "classes" not in result


@pytest.mark.parametrize("spec,expected", [("[3,17]", [3, 17]), ("'0:3'", [0, 1, 2]), ("5", [5])])
def test_channel_list_range_and_number(make_cfg, shared: Path, spec: str, expected: list[int]) -> None:
    result = visualize(make_cfg, shared, f"visualize.channels={spec}", "visualize.classes=[]",
                       "visualize.all_classes_up_to=0", "visualize.top=2")
    assert result["channels"] == expected and result["selection"] == "configured"
    index = pd.read_parquet(result["index"])
    assert sorted(index.loc[index.kind == "ascent", "channel"]) == expected
    # deconv projections exist for every chosen channel that fires on some image (dead ones have none)
    store = Context(make_cfg([f"paths.cache={shared}"])).store()
    alive = [c for c in expected if store.topk("features.relu4", c, k=1)["value"].max() > 0]
    assert alive and sorted(index.loc[index.kind == "deconv", "channel"].unique()) == alive


def test_parse_channels() -> None:
    assert parse_channels("2:9:3", 16, "l") == [2, 5, 8]
    assert parse_channels(":3", 16, "l") == [0, 1, 2]
    assert parse_channels("14:", 16, "l") == [14, 15]
    assert parse_channels("1, 4,4", 16, "l") == [1, 4]
    assert parse_channels(None, 16, "l") is None
    with pytest.raises(PipelineError, match=r"out of range.*0\.\.15"):
        parse_channels("0:40", 16, "l")
    with pytest.raises(PipelineError, match=r"channel 16 is out of range.*16 channels: use 0\.\.15"):
        parse_channels([3, 16], 16, "l")
    with pytest.raises(PipelineError, match="selects no channel"):
        parse_channels("5:5", 16, "l")
    with pytest.raises(PipelineError, match="not a channel list"):
        parse_channels("first", 16, "l")


def test_layer_not_in_store_uses_a_sample_and_hooked_mode(make_cfg, shared: Path) -> None:
    result = visualize(make_cfg, shared, "visualize.layer=features.conv3", "visualize.deconv.mode=hooked",
                       "visualize.sample=50", "visualize.classes=[]", "visualize.all_classes_up_to=0")
    assert result["source"] == "sample" and result["deconv_mode"] == "hooked"
    assert "over 50 images (sample)" in result["selection"]
    index = pd.read_parquet(result["index"])
    assert (index.kind == "deconv").sum() == 2 * 4 and index["png"].map(lambda p: Path(p).is_file()).all()


def test_errors(make_cfg, shared: Path) -> None:
    with pytest.raises(PipelineError, match=r"unknown layer 'features.relu9'.*features\.relu4.*stage=layers"):
        visualize(make_cfg, shared, "visualize.layer=features.relu9")
    with pytest.raises(PipelineError, match=r"not a \(C, H, W\) channel map.*features\.conv4"):
        visualize(make_cfg, shared, "visualize.layer=fc")
    with pytest.raises(PipelineError, match=r"channel 128 is out of range.*128 channels: use 0\.\.127"):
        visualize(make_cfg, shared, "visualize.channels=[1,128]")
    with pytest.raises(PipelineError, match="deconv.mode='unpool' is not one of auto, explicit, hooked"):
        visualize(make_cfg, shared, "visualize.deconv.mode=unpool")


def test_explicit_deconv_refuses_a_batchnorm_network(make_cfg, shared: Path) -> None:
    with pytest.raises(PipelineError, match=r"mode=explicit cannot handle resnet18.*BatchNorm2d.*mode=hooked"):
        visualize(make_cfg, shared, "model=torchvision", "model.arch=resnet18", "visualize.layer=layer1",
                  "visualize.deconv.mode=explicit")


def test_pre_activation_layer() -> None:
    digits, eff = DigitsCNN(), EfficientNetLite()
    assert pre_activation(digits, "features.relu4") == "features.conv4"
    assert pre_activation(digits, "features") == "features.conv4"  # a Sequential ending in a ReLU
    assert pre_activation(digits, "features.pool2") == "features.pool2"
    assert pre_activation(eff, "head") == "head.bn"
    assert pre_activation(eff, "blocks.4") == "blocks.4"  # residual sum, no final activation


def test_resolve_classes() -> None:
    names = imagenet_classes()
    assert resolve_classes(["Tabby", "golden retriever", 1], names, 10) == [281, 207, 1]
    assert resolve_classes(["anything"], [str(i) for i in range(10)], 10) == list(range(10))
    with pytest.raises(PipelineError, match=r"unknown class name 'tabbby'.*Did you mean: tabby"):
        resolve_classes(["tabbby"], names, 10)
    with pytest.raises(PipelineError, match=r"class 1000 is out of range.*0\.\.999"):
        resolve_classes([1000], names, 10)


@pytest.mark.slow
def test_digits_classify_their_own_class_visualisations(make_cfg) -> None:
    """The issue's check in numbers: a trained digits_cnn gives each of its 10 class pictures (the
    default ascent settings) at least 90% confidence. Trains the default architecture for 4 epochs
    so that it fits CI (the tiny 1-epoch model is near chance and cannot pass; with the 1x1 last conv,
    3000 images for 6 epochs left class 6 at 0.001; 5000 images for 4 epochs (test accuracy 0.977)
    and the real model give at least 0.9997 for every class)."""
    summary = run_stages(make_cfg(["stage=[train,visualize]", "data.n_train=5000", "data.n_test=300",
                                   "train.epochs=4", "train.batch_size=64", "visualize.top=1",
                                   "visualize.n_most_active=1"]))
    result = summary["stages"]["visualize"]
    assert summary["stages"]["train"]["test_accuracy"] > 0.8
    assert len(result["class_confidence"]) == 10
    assert result["min_class_confidence"] >= 0.9, result["class_confidence"]
    index = pd.read_parquet(result["index"])
    classes = index[index.kind == "class"]
    assert (classes["predicted"] == classes["class_index"]).all()
