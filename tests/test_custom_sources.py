"""The user's own model (``model=custom``) and data (``data=custom``) by ``_target_``, on tiny
modules and datasets defined here, plus the torchvision ``model.weights`` enum and timm's own transform."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from torchvision import transforms as T

from pipeline.cache import Cache
from pipeline.data import load_dataset
from pipeline.errors import PipelineError
from pipeline.models import build_model
from tests.helpers import compose_config


def make_net(width: int = 4, num_classes: int = 3, channels: int = 3) -> nn.Module:
    """conv-ReLU-GAP-linear: a tiny classifier a user might hand in."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(width, num_classes))


def not_a_module() -> str:
    return "a string"


def make_transform(size: int = 24) -> T.Compose:
    return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize((0.2, 0.3, 0.4), (0.5, 0.6, 0.7))])


class TensorImages(Dataset):
    """n random (3, 16, 16) float tensors with labels i % 2."""

    classes = ["even", "odd"]

    def __init__(self, n: int = 4) -> None:
        self.images = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], i % 2


class Unpaired(TensorImages):
    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        return self.images[i]


class PilImages(Dataset):
    """Three random 12x12 RGB PIL images labelled 0, 1, 2."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        rng = np.random.default_rng(i)
        return Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)), i


def records(folder: str) -> list[dict]:
    """Two records with labels, a split and a box, written under ``folder``."""
    out = []
    for i, label in enumerate(["cat", "dog"]):
        p = Path(folder) / f"{i}.png"
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(p)
        out.append({"path": str(p), "label": label, "split": "test" if i else "train", "box": [1, 2, 10, 12]})
    return out


def paths(folder: str) -> list[str]:
    return [r["path"] for r in records(folder)]


CUSTOM = ["model=custom", "model._target_=tests.test_custom_sources.make_net"]


def test_custom_model_is_instantiated_with_its_keyword_arguments(make_cfg) -> None:
    cfg = make_cfg([*CUSTOM, "+model.width=6", "+model.num_classes=5", "model.image_size=32"])
    b = build_model(cfg.model)
    assert isinstance(b.module[0], nn.Conv2d) and b.module[0].out_channels == 6
    assert b.class_names == ["0", "1", "2", "3", "4"] and b.input_shape == (3, 32, 32)
    assert b.mean == (0.485, 0.456, 0.406) and not b.module[1].inplace
    assert b.transform(Image.new("RGB", (50, 40))).shape == (3, 32, 32)
    assert build_model(cfg.model).key == b.key  # same weights -> same key
    cfg2 = make_cfg([*CUSTOM, "+model.width=7", "model.image_size=32"])
    assert build_model(cfg2.model).key != b.key


def test_custom_model_class_names_and_transform(make_cfg, tmp_path: Path) -> None:
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\n")
    cfg = make_cfg([*CUSTOM, f"model.class_names={names}",
                    "+model.transform._target_=tests.test_custom_sources.make_transform", "+model.transform.size=24"])
    b = build_model(cfg.model)
    assert b.class_names == ["a", "b", "c"] and b.input_shape == (3, 24, 24)
    assert b.mean == (0.2, 0.3, 0.4) and b.std == (0.5, 0.6, 0.7)
    with pytest.raises(PipelineError, match="has 2 names but the model has 3 classes"):
        build_model(make_cfg([*CUSTOM, "model.image_size=16", "model.class_names=[x,y]"]).model)


@pytest.mark.parametrize("target, message", [
    ("tests.test_custom_sources.make_nett", "has no 'make_nett'. Did you mean: make_net"),
    ("no_such_pkg.make", "no module 'no_such_pkg' can be imported"),
    ("tests.test_custom_sources.not_a_module", "returned a str, not a torch.nn.Module"),
])
def test_custom_model_bad_target_is_one_line(make_cfg, target: str, message: str) -> None:
    with pytest.raises(PipelineError, match=message) as e:
        build_model(make_cfg(["model=custom", f"model._target_={target}"]).model)
    assert "\n" not in str(e.value)


def test_custom_model_weights_path_loads(make_cfg, tmp_path: Path) -> None:
    net = make_net()
    with torch.no_grad():
        net[-1].bias.fill_(3.0)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    b = build_model(make_cfg([*CUSTOM, "model.image_size=16", f"model.weights_path={tmp_path / 'w.pt'}"]).model)
    assert torch.equal(b.module[-1].bias, torch.full((3,), 3.0))


def _data(tmp_path: Path, overrides: list[str]):
    cfg = compose_config(tmp_path, ["data=custom", *overrides], tiny=False)  # no clutter-digit sizes
    return load_dataset(cfg.data, Cache(tmp_path / "cache"))


def test_custom_data_records_with_labels_splits_and_boxes(tmp_path: Path) -> None:
    d = _data(tmp_path, ["data._target_=tests.test_custom_sources.records", f"+data.folder={tmp_path}"])
    r = d.records
    assert d.class_names == ["cat", "dog"] and r["label"].tolist() == [0, 1]
    assert r["split"].tolist() == ["train", "test"]
    assert r[["box_x0", "box_y0", "box_x1", "box_y1"]].iloc[0].tolist() == [1, 2, 10, 12]
    assert r["image_id"].iloc[0] == hashlib.sha256((tmp_path / "0.png").read_bytes()).hexdigest()


def test_custom_data_plain_paths(tmp_path: Path) -> None:
    d = _data(tmp_path, ["data._target_=tests.test_custom_sources.paths", f"+data.folder={tmp_path}"])
    assert len(d.records) == 2 and d.records["label"].isna().all() and set(d.records["split"]) == {"all"}


@pytest.mark.parametrize("target", ["TensorImages", "PilImages"])
def test_custom_dataset_images_written_once_by_content(tmp_path: Path, target: str) -> None:
    d = _data(tmp_path, [f"data._target_=tests.test_custom_sources.{target}"])
    r = d.records
    assert all(hashlib.sha256(Path(p).read_bytes()).hexdigest() == i for p, i in zip(r["path"], r["image_id"]))
    assert r["label"].tolist() == ([0, 1, 0, 1] if target == "TensorImages" else [0, 1, 2])
    again = _data(tmp_path, [f"data._target_=tests.test_custom_sources.{target}"])
    assert again.key == d.key and again.records["path"].tolist() == r["path"].tolist()
    if target == "TensorImages":
        assert d.class_names == ["even", "odd"]
        assert Image.open(r["path"].iloc[0]).size == (16, 16)


def test_custom_dataset_bad_items_are_one_line_and_write_nothing(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"item 0 is Tensor, not \(image, label\)") as e:
        _data(tmp_path, ["data._target_=tests.test_custom_sources.Unpaired"])
    assert "\n" not in str(e.value) and not (tmp_path / "cache" / "data").exists()
    with pytest.raises(PipelineError, match="has no 'Tensorimages'"):
        _data(tmp_path, ["data._target_=tests.test_custom_sources.Tensorimages"])


@pytest.mark.slow
def test_custom_model_and_data_run_explain(tmp_path: Path) -> None:
    from pipeline.stages import run_stages

    cfg = compose_config(tmp_path, [*CUSTOM, "model.image_size=16", "data=custom",
                                    "data._target_=tests.test_custom_sources.TensorImages", "~data.n_train",
                                    "~data.n_test", "stage=explain",
                                    "explain.methods=[saliency,gradcam]", "explain.select.limit=2"])
    summary = run_stages(cfg)
    assert summary["stages"]["explain"]["table"]


def test_torchvision_weights_enum_gives_transform_and_categories(make_cfg) -> None:
    b = build_model(make_cfg(["model=torchvision", "model.arch=resnet18",
                              "model.weights=ResNet18_Weights.IMAGENET1K_V1", "model.resize=72",
                              "model.image_size=64"]).model)
    assert b.class_names[:2] == ["tench", "goldfish"] and b.num_classes == 1000
    assert b.input_shape == (3, 64, 64) and b.transform.resize_size == [72]
    assert b.transform(Image.new("RGB", (90, 80))).shape == (3, 64, 64)
    with pytest.raises(PipelineError, match="Did you mean: ResNet18_Weights.IMAGENET1K_V1") as e:
        build_model(make_cfg(["model=torchvision", "model.arch=resnet18",
                              "model.weights=ResNet18_Weights.IMAGENET1K_V2"]).model)
    assert "\n" not in str(e.value)


def test_timm_uses_its_data_config_with_overrides(make_cfg) -> None:
    base = ["model=timm", "model.arch=test_resnet", "model.num_classes=4", "model.image_size=32"]
    b = build_model(make_cfg(base).model)
    assert b.mean == b.meta["timm_data_config"]["mean"] and b.input_shape == (3, 32, 32)
    b2 = build_model(make_cfg([*base, "model.resize=40", "model.mean=[0.1,0.2,0.3]", "model.std=[1,1,1]"]).model)
    assert b2.mean == (0.1, 0.2, 0.3) and b2.transform.transforms[0].size == 40
    assert b2.transform(Image.new("RGB", (60, 50))).shape == (3, 32, 32)


def test_every_model_yaml_declares_the_preprocessing_it_reads(make_cfg) -> None:
    for name in ["custom", "torchvision", "timm", "torchscript", "exported"]:
        cfg = make_cfg([f"model={name}"]).model
        assert {"resize", "mean", "std"} <= set(cfg), name
