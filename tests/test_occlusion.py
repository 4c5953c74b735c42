"""Plain batched occlusion: Captum parity for the score-drop map, boxes, fills and user errors."""

from __future__ import annotations

import pytest
import torch
from captum.attr import Occlusion
from torch import nn
from torchvision.models import resnet18

from pipeline.errors import PipelineError
from pipeline.methods.blur import gaussian_blur
from pipeline.methods.occlusion import (
    make_fill,
    occlusion,
    occlusion_boxes,
    window_average,
)
from pipeline.models.digits import DigitsCNN


def _captum_map(model: nn.Module, x: torch.Tensor, target: int, window: int, stride: int,
                baseline: torch.Tensor | float) -> torch.Tensor:
    """Captum's occlusion attribution with a window spanning all channels, as (C, H, W)."""
    c = x.shape[1]
    attr = Occlusion(model).attribute(x, sliding_window_shapes=(c, window, window),
                                      strides=(c, stride, stride), baselines=baseline,
                                      target=target, perturbations_per_eval=64)
    return attr[0]


def _assert_matches_captum(model: nn.Module, x: torch.Tensor, target: int, window: int,
                           stride: int, fill: str, **kw: float) -> None:
    result = occlusion(model, x, target, window=window, stride=stride, fill=fill, **kw)
    baseline = make_fill(x, fill, kw.get("fill_value", 0.0), kw.get("blur_sigma", 5.0))
    ref = _captum_map(model, x, target, window, stride, baseline)
    for channel in ref:  # Captum repeats the same map on every channel
        torch.testing.assert_close(result.score_drop, channel, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fill", ["constant", "mean", "blur"])
def test_digits_matches_captum(fill: str) -> None:
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    x = torch.randn(1, 1, 64, 64)
    # window 12 / stride 8 on 64 pixels clips the last window, exercising Captum's edge rule
    _assert_matches_captum(model, x, 3, 12, 8, fill, fill_value=0.5, blur_sigma=2.0)


def test_resnet18_matches_captum() -> None:
    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    _assert_matches_captum(model, x, 7, 16, 12, "mean")


def test_boxes_follow_captum_steps() -> None:
    boxes, grid = occlusion_boxes(10, 7, window=4, stride=3)
    # height: ceil(6/3)+1 = 3 starts (0,3,6); width: ceil(3/3)+1 = 2 starts (0,3)
    assert grid == (3, 2)
    assert boxes.tolist() == [[0, 0, 4, 4], [0, 3, 4, 7], [3, 0, 7, 4], [3, 3, 7, 7],
                              [6, 0, 10, 4], [6, 3, 10, 7]]
    clipped, grid = occlusion_boxes(10, 10, window=4, stride=4)
    assert grid == (3, 3) and clipped[-1].tolist() == [8, 8, 10, 10]


def test_result_fields_are_consistent() -> None:
    torch.manual_seed(1)
    model = DigitsCNN().eval()
    x = torch.randn(1, 1, 64, 64)
    r = occlusion(model, x, 2, window=16, stride=16, batch_size=5)
    with torch.no_grad():
        logits = model(x)
    assert r.base_score == pytest.approx(float(logits[0, 2]))
    assert r.base_prob == pytest.approx(float(torch.softmax(logits, 1)[0, 2]))
    assert r.score_drop_grid.shape == r.prob_grid.shape == (4, 4)
    assert r.score_drop.shape == r.prob.shape == (64, 64)
    # Non-overlapping windows: each pixel shows its window's value.
    assert torch.allclose(r.prob[20, 40], r.prob_grid[1, 2])
    occluded = x.clone()
    occluded[..., 16:32, 32:48] = 0.0
    with torch.no_grad():
        expected = float(torch.softmax(model(occluded), 1)[0, 2])
    assert r.prob_grid[1, 2] == pytest.approx(expected, abs=1e-6)


def test_window_average_counts_overlaps() -> None:
    boxes, grid = occlusion_boxes(4, 4, window=2, stride=1)
    values = torch.arange(9.0).reshape(grid)
    out = window_average(values, boxes, 4, 4)
    assert out[0, 0] == 0.0  # covered by one window
    assert out[1, 1] == pytest.approx((0 + 1 + 3 + 4) / 4)


def test_blur_keeps_constant_image() -> None:
    x = torch.full((1, 2, 9, 9), 3.0)
    assert torch.allclose(gaussian_blur(x, 1.5), x)
    assert make_fill(torch.randn(1, 3, 8, 8), "mean").std(dim=(2, 3)).max() < 1e-6


def test_custom_engine_is_used() -> None:
    model = DigitsCNN().eval()
    x = torch.randn(1, 1, 64, 64)
    calls: list[int] = []

    def engine(boxes: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        calls.append(len(boxes))
        return torch.zeros(len(boxes), 10)

    r = occlusion(model, x, 0, window=32, stride=32, engine=engine)
    assert calls == [4]
    assert torch.allclose(r.prob_grid, torch.full((2, 2), 0.1))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"target": 10}, "out of range"),
    ({"target": -1}, "out of range"),
    ({"window": 65}, "larger than the image"),
    ({"stride": 0}, "stride must be positive"),
    ({"stride": -2}, "stride must be positive"),
    ({"window": 4, "stride": 8}, "larger than the window"),
    ({"fill": "blurr"}, "Did you mean: blur"),
    ({"fill": "blur", "blur_sigma": 0.0}, "blur_sigma"),
    ({"engine": "incremntal"}, "Did you mean: incremental"),
    ({"engine": "plain", "tau": 0.5}, "apply only to engine='approximate'"),
    ({"engine": "approximate", "tolerence": 0.5}, "Did you mean: tolerance"),
])
def test_user_errors(kwargs: dict, match: str) -> None:
    model = DigitsCNN().eval()
    x = torch.randn(1, 1, 64, 64)
    args = {"target": 0, "window": 16, "stride": 8} | kwargs
    with pytest.raises(PipelineError, match=match):
        occlusion(model, x, **args)
