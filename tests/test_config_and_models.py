"""Every config composes and instantiates; every model source loads from files the test writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.cache import Cache
from pipeline.data import load_dataset
from pipeline.errors import PipelineError
from pipeline.models import build_model
from pipeline.models.digits import DigitsCNN, fold_batchnorm
from pipeline.models.layers import guess_default_layers, layer_table, resolve_layers
from pipeline.runtime import Context
from pipeline.stages import run_stages

CONF = Path(__file__).resolve().parents[1] / "conf"


def _write_images(folder: Path, n: int = 3) -> None:
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((20, 24, 3), 40 * i + (cls == "b") * 100, np.uint8)).save(folder / cls / f"{i}.png")


def test_every_config_in_every_group_composes_and_instantiates(make_cfg, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    _write_images(folder)
    pd.DataFrame({"path": [str(p) for p in sorted(folder.rglob("*.png"))], "label": ["x", "y"] * 3}).to_csv(
        tmp_path / "m.csv", index=False)
    scripted = tmp_path / "m.pt"
    torch.jit.script(DigitsCNN().eval()).save(str(scripted))
    exported = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(DigitsCNN().eval(), (torch.zeros(2, 1, 64, 64),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)), exported)
    extra = {"imagefolder": [f"data.path={folder}"], "manifest": [f"data.path={tmp_path / 'm.csv'}"],
             "photos": ["data.names=[chelsea]"],
             "custom": ["data._target_=tests.test_custom_sources.paths", f"+data.folder={folder}", "~data.n_train",
                        "~data.n_test"]}
    for path in sorted((CONF / "data").glob("*.yaml")):
        cfg = make_cfg([f"data={path.stem}", *extra.get(path.stem, [])])
        data = load_dataset(cfg.data, Cache(cfg.paths.cache))
        assert len(data.records) > 0 and data.records["image_id"].str.len().eq(64).all()
    model_extra = {"torchscript": [f"model.path={scripted}", "model.channels=1", "model.image_size=64"],
                   "exported": [f"model.path={exported}"],
                   "timm": ["model.image_size=64"], "torchvision": ["model.image_size=64"],
                   "custom": ["model._target_=tests.test_custom_sources.make_net", "model.image_size=64"]}
    for path in sorted((CONF / "model").glob("*.yaml")):
        cfg = make_cfg([f"model={path.stem}", *model_extra.get(path.stem, [])])
        bundle = build_model(cfg.model)
        x = bundle.transform(Image.new("RGB", (80, 70), (120, 30, 200)))
        assert tuple(x.shape) == bundle.input_shape
        with torch.no_grad():
            assert bundle.module(x[None]).shape == (1, bundle.num_classes)
        assert len(bundle.key) == 64
    for path in sorted((CONF / "train").glob("*.yaml")):
        assert make_cfg([f"train={path.stem}"]).train.epochs >= 1


def test_torchvision_timm_and_torchscript_load_from_files(make_cfg, tmp_path: Path) -> None:
    import timm
    import torchvision

    ref = torchvision.models.get_model("resnet18", weights=None, num_classes=7).eval()
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "tv.pt")
    x = torch.randn(1, 3, 64, 64)
    tv = build_model(make_cfg(["model=torchvision", "model.num_classes=7", f"model.weights_path={tmp_path / 'tv.pt'}",
                               "model.image_size=64"]).model)
    with torch.no_grad():
        assert torch.allclose(tv.module(x), ref(x), atol=1e-5)
    assert tv.class_names == [str(i) for i in range(7)]

    tref = timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()
    torch.save(tref.state_dict(), tmp_path / "timm.pt")
    tm = build_model(make_cfg(["model=timm", "model.arch=resnet10t", "model.num_classes=5",
                               f"model.weights_path={tmp_path / 'timm.pt'}"]).model)
    with torch.no_grad():
        assert torch.allclose(tm.module(x), tref(x), atol=1e-5)
    assert tm.default_layers  # timm's feature_info blocks

    net = DigitsCNN().eval()
    torch.jit.trace(net, torch.zeros(1, 1, 64, 64)).save(str(tmp_path / "traced.pt"))
    sm = build_model(make_cfg(["model=torchscript", f"model.path={tmp_path / 'traced.pt'}", "model.channels=1",
                               "model.image_size=64"]).model)
    xg = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(sm.module(xg), net(xg), atol=1e-5)
    assert sm.num_classes == 10


def test_bad_checkpoints_are_clear_errors(make_cfg, tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="weights-only"):
        build_model(make_cfg(["model=torchvision", f"model.weights_path={tmp_path / 'junk.pt'}"]).model)
    with pytest.raises(PipelineError, match="does not exist"):
        build_model(make_cfg(["model=torchvision", f"model.weights_path={tmp_path / 'missing.pt'}"]).model)
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pt")
    with pytest.raises(PipelineError, match="does not match"):
        build_model(make_cfg(["model=torchvision", f"model.weights_path={tmp_path / 'wrong.pt'}"]).model)
    with pytest.raises(PipelineError, match="resnet18"):
        build_model(make_cfg(["model=torchvision", "model.arch=resnt18"]).model)


def test_unknown_layer_lists_close_matches() -> None:
    net = DigitsCNN()
    with pytest.raises(PipelineError) as e:
        resolve_layers(net, ["features.conv5"])
    assert "features.conv4" in str(e.value) and "stage=layers" in str(e.value)
    assert resolve_layers(net, ["features.relu*", "fc"]) == [
        "features.relu1", "features.relu2", "features.relu3", "features.relu4", "fc"]


def test_layer_table_and_default_layers() -> None:
    import torchvision

    table = {li.name: li.shape for li in layer_table(DigitsCNN(), (1, 64, 64))}
    assert table["features.pool2"] == (32, 16, 16) and table["fc"] == (10,)
    layers = guess_default_layers(torchvision.models.resnet18(), (3, 64, 64))
    assert layers[:5] == ["relu", "layer1", "layer2", "layer3", "layer4"] and layers[-1] == "layer4.1.conv2"


def test_fold_batchnorm_preserves_outputs() -> None:
    torch.manual_seed(0)
    net = DigitsCNN(batchnorm=True)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    net.eval()
    plain = DigitsCNN().eval()
    plain.load_state_dict(fold_batchnorm(net.state_dict()))
    x = torch.randn(3, 1, 64, 64)
    assert torch.allclose(net(x), plain(x), atol=1e-4)


def test_train_stage_is_cached_and_deterministic(tmp_path: Path, make_cfg) -> None:
    first = run_stages(make_cfg(["stage=train"]))
    assert first["stages"]["train"]["test_accuracy"] >= 0
    assert first["cache"]["models"]["misses"] == 1
    again = run_stages(make_cfg(["stage=train"]))
    assert again["cache"]["models"] == {"hits": 1, "misses": 0}
    assert again["stages"]["train"]["key"] == first["stages"]["train"]["key"]
    # the same config trained from scratch in another cache gives the same weights
    other = run_stages(make_cfg(["stage=train", f"paths.cache={tmp_path / 'other_cache'}"]))
    assert other["stages"]["train"]["key"] == first["stages"]["train"]["key"]


def test_device_choice(make_cfg) -> None:
    assert Context(make_cfg(["device=cpu"])).device.type == "cpu"
    assert Context(make_cfg(["device=auto"])).device.type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="device=cpu"):
            Context(make_cfg(["device=cuda"]))


def test_cli_user_error_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline", "stage=layers", "model=torchvision",
                           "model.arch=resnt18", f"paths.outputs={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown torchvision architecture 'resnt18'. Did you mean: resnet18, resnet152, resnet101, resnet50, "
        "resnet34?"]
    assert "Traceback" not in proc.stderr + proc.stdout
