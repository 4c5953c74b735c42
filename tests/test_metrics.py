"""Pointing game, box IoU, deletion/insertion AUC and the centre baseline."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from pipeline.errors import PipelineError
from pipeline.methods.blur import gaussian_blur
from pipeline.methods.metrics import (baseline_image, box_iou, center_map, deletion, insertion,
                                      pointing_game, pointing_tolerance, trapezoid_auc)


def peak_map(h: int, w: int, y: int, x: int) -> torch.Tensor:
    m = torch.zeros(1, h, w)
    m[0, y, x] = 1.0
    return m


def test_pointing_game_hits_and_misses() -> None:
    m = peak_map(64, 64, 10, 20)
    assert pointing_game(m, torch.tensor([[15, 5, 25, 15]]), tolerance=0).tolist() == [True]
    assert pointing_game(m, torch.tensor([[30, 30, 40, 40]])).tolist() == [False]
    # x1 is exclusive: a box ending at x1=20 holds pixels up to 19, so the peak is 1 px outside.
    left = torch.tensor([[0, 0, 20, 64]])
    assert pointing_game(m, left, tolerance=0).tolist() == [False]
    assert pointing_game(m, left, tolerance=1).tolist() == [True]
    right = torch.tensor([[22, 0, 30, 64]])
    assert pointing_game(m, right, tolerance=1.5).tolist() == [False]
    assert pointing_game(m, right, tolerance=2).tolist() == [True]
    # The default tolerance is 15 px at 224, about 4.3 px at 64: enough for a peak 4 px away.
    assert pointing_tolerance(224, 300) == 15
    assert pointing_tolerance(64, 64) == pytest.approx(4.29, abs=0.01)
    assert pointing_game(m, torch.tensor([[24, 0, 30, 64]])).tolist() == [True]
    assert pointing_game(m, torch.tensor([[25, 0, 30, 64]])).tolist() == [False]


def test_pointing_game_several_boxes_per_image() -> None:
    maps = torch.cat([peak_map(32, 32, 5, 5), peak_map(32, 32, 25, 25), peak_map(32, 32, 0, 0)])
    boxes = [torch.tensor([[20, 20, 30, 30], [0, 0, 8, 8]]), torch.tensor([[20, 20, 30, 30]]),
             torch.zeros(0, 4)]
    assert pointing_game(maps, boxes, tolerance=0).tolist() == [True, True, False]
    with pytest.raises(PipelineError, match="2 box sets for 3 maps"):
        pointing_game(maps, boxes[:2])


def test_box_iou_by_hand_and_against_torchvision() -> None:
    a = torch.tensor([[0, 0, 10, 10], [0, 0, 4, 4], [3, 3, 3, 8]])
    b = torch.tensor([[5, 5, 15, 15], [0, 0, 10, 10], [20, 20, 30, 30]])
    iou = box_iou(a, b)
    assert iou[0, 0].item() == pytest.approx(25 / 175)
    assert iou[0, 1].item() == 1.0 and iou[0, 2].item() == 0.0
    assert iou[1, 1].item() == pytest.approx(16 / 100)
    assert iou[2].tolist() == [0.0, 0.0, 0.0]  # a zero-area box
    torch.testing.assert_close(iou[:2].float(), torchvision.ops.box_iou(a[:2].float(), b.float()))


def test_center_map_peaks_at_the_centre() -> None:
    m = center_map(31, 41)
    assert m.shape == (31, 41) and m[15, 20] == 1.0 and m.min() == 0.0
    assert divmod(int(m.argmax()), 41) == (15, 20)
    assert pointing_game(m[None], torch.tensor([[15, 10, 26, 21]]), tolerance=0).item()
    even = center_map(4, 4)
    torch.testing.assert_close(even[1:3, 1:3], torch.full((2, 2), float(even.max())))
    assert even[1:3, 1:3].min() > even[0].max()


def test_trapezoid_and_blur() -> None:
    assert trapezoid_auc(torch.ones(1, 11)).item() == pytest.approx(1.0)
    assert trapezoid_auc(torch.linspace(0, 1, 5)[None]).item() == pytest.approx(0.5)
    flat = torch.full((1, 2, 9, 9), 3.0)
    torch.testing.assert_close(gaussian_blur(flat, 2.0), flat)
    spike = torch.zeros(1, 1, 21, 21)
    spike[0, 0, 10, 10] = 1.0
    blurred = gaussian_blur(spike, 1.5)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5) and blurred.max() < 0.1
    x = torch.randn(2, 3, 8, 8)
    assert baseline_image(x, "zero").eq(0).all()
    torch.testing.assert_close(baseline_image(x, "mean")[:, :, 0, 0], x.mean(dim=(2, 3)))
    torch.testing.assert_close(baseline_image(x, torch.ones(3, 1, 1)), torch.ones_like(x))
    with pytest.raises(PipelineError, match="Unknown baseline 'noise'"):
        baseline_image(x, "noise")


class RegionScore(nn.Module):
    """Two classes; class 0's logit is the sum of the pixels in a known square minus an offset."""

    def __init__(self) -> None:
        super().__init__()
        self.region = (slice(4, 12), slice(6, 14))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, 0, self.region[0], self.region[1]].flatten(1).sum(1) / 8 - 4
        return torch.stack([s, torch.zeros_like(s)], 1)


def test_a_perfect_map_beats_a_random_map() -> None:
    model = RegionScore()
    x = torch.ones(2, 1, 20, 20)
    perfect = torch.zeros(2, 20, 20)
    perfect[:, 4:12, 6:14] = 1.0
    noise = torch.rand(2, 20, 20, generator=torch.Generator().manual_seed(0))
    good, bad = deletion(model, x, 0, perfect, steps=20), deletion(model, x, 0, noise, steps=20)
    assert good.curve.shape == (2, 21)
    assert (good.auc < bad.auc - 0.3).all()
    # Deleting the 64 region pixels (16 % of the image) takes the score from 4 to -4.
    assert good.curve[0, 0].item() == pytest.approx(torch.sigmoid(torch.tensor(4.0)).item())
    assert good.curve[0, 4].item() == pytest.approx(torch.sigmoid(torch.tensor(-4.0)).item(),
                                                    abs=0.02)
    gain, loss = (insertion(model, x, 0, perfect, steps=20, baseline="zero"),
                  insertion(model, x, 0, noise, steps=20, baseline="zero"))
    assert (gain.auc > loss.auc + 0.3).all()
    torch.testing.assert_close(gain.curve[:, -1], good.curve[:, 0])


def test_curves_do_not_depend_on_the_batch_size() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 5)).eval()
    x, maps = torch.randn(3, 3, 16, 16), torch.rand(3, 16, 16)
    a = insertion(model, x, [0, 3, 4], maps, steps=7, batch_size=5)
    b = insertion(model, x, [0, 3, 4], maps, steps=7, batch_size=64)
    torch.testing.assert_close(a.curve, b.curve)
    torch.testing.assert_close(a.auc, b.auc)
    with torch.no_grad():
        full = model(x).softmax(1)[torch.arange(3), torch.tensor([0, 3, 4])]
    torch.testing.assert_close(a.curve[:, -1], full)
    with pytest.raises(PipelineError, match="out of range"):
        deletion(model, x, 5, maps, steps=2)
    with pytest.raises(PipelineError, match="do not match"):
        deletion(model, x, 0, maps[:, :8], steps=2)
    with pytest.raises(PipelineError, match="steps"):
        deletion(model, x, 0, maps, steps=0)
