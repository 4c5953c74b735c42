"""Gradient saliency, SmoothGrad and the saliency-to-mask segmentation."""

from __future__ import annotations

import pytest
import torch
from captum.attr import Saliency
from torch import nn

from pipeline.errors import PipelineError
from pipeline.methods.metrics import box_iou
from pipeline.methods.saliency import input_gradient, saliency, saliency_map
from pipeline.methods.segmentation import fraction_mask, grabcut_mask, quantile_mask
from pipeline.models.digits import DigitsCNN


@pytest.mark.parametrize("which", ["digits", "resnet"])
def test_saliency_matches_captum_signed(which: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(which)
    channels = 1 if which == "digits" else 3
    x = torch.randn(3, channels, 64, 64, generator=torch.Generator().manual_seed(1))
    targets = [2, 0, 5]
    ours = saliency(model, x, targets)
    theirs = Saliency(model).attribute(x, target=targets, abs=False)
    torch.testing.assert_close(ours.grad, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.map, theirs.abs().amax(1), rtol=0, atol=1e-6)
    assert ours.map.shape == (3, 64, 64)


def test_batched_targets_equal_one_by_one(digits: nn.Module) -> None:
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    both = saliency_map(digits, x, [4, 9])
    torch.testing.assert_close(both[0], saliency_map(digits, x[:1], 4)[0], rtol=0, atol=1e-7)
    torch.testing.assert_close(both[1], saliency_map(digits, x[1:], 9)[0], rtol=0, atol=1e-7)
    assert not torch.allclose(both[1], saliency_map(digits, x[1:], 4)[0])


class ThresholdSum(nn.Module):
    """Score = sum(relu(x - 0.5)): its gradient is 1 where a pixel exceeds 0.5, else 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(x - 0.5).flatten(1).sum(1)
        return torch.stack([s, -s], 1)


def test_smoothgrad_noise_is_a_fraction_of_the_range() -> None:
    x = torch.zeros(1, 1, 32, 32)
    x[..., :16] = 1.0  # value range 1; left half at 1 (gradient 1), right half at 0 (gradient 0)
    plain = saliency(ThresholdSum(), x, 0).grad
    assert plain[..., :16].eq(1).all() and plain[..., 16:].eq(0).all()
    smooth = saliency(ThresholdSum(), x, 0, samples=50, noise=0.5, seed=3).grad
    # With sigma = 0.5 a pixel at 0 crosses 0.5 with probability P(z > 1) = 0.159.
    assert smooth[..., 16:].mean().item() == pytest.approx(0.1587, abs=0.01)
    assert smooth[..., :16].mean().item() == pytest.approx(1 - 0.1587, abs=0.01)


def test_smoothgrad_is_seeded(digits: nn.Module) -> None:
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(4))
    a = saliency(digits, x, 1, samples=3, seed=7).grad
    torch.testing.assert_close(a, saliency(digits, x, 1, samples=3, seed=7).grad, rtol=0, atol=0)
    assert not torch.allclose(a, saliency(digits, x, 1, samples=3, seed=8).grad)
    torch.testing.assert_close(saliency(digits, x, 1, samples=2, noise=0.0).grad,
                               input_gradient(digits, x, 1), rtol=0, atol=1e-7)


def test_saliency_errors(digits: nn.Module) -> None:
    x = torch.randn(2, 1, 64, 64)
    with pytest.raises(PipelineError, match="out of range.*10 classes"):
        saliency(digits, x, 10)
    with pytest.raises(PipelineError, match="out of range"):
        saliency(digits, x, [0, -1])
    with pytest.raises(PipelineError, match="3 target classes for 2 images"):
        saliency(digits, x, [0, 1, 2])
    with pytest.raises(PipelineError, match="samples >= 0"):
        saliency(digits, x, 0, samples=-1)


def test_threshold_masks() -> None:
    maps = torch.arange(100, dtype=torch.float32).view(1, 10, 10)
    assert quantile_mask(maps, 0.9).sum() == 10
    assert fraction_mask(maps, 0.5).sum() == 50  # values 50..99 are >= 0.5 * 99
    assert not fraction_mask(-maps, 0.5).any()
    with pytest.raises(PipelineError, match=r"\[0, 1\]"):
        quantile_mask(maps, 1.5)


def test_grabcut_recovers_the_object_from_a_partial_map() -> None:
    gen = torch.Generator().manual_seed(5)
    h = w = 48
    image = torch.zeros(2, 3, h, w)
    image[:, 2] = 1.0  # blue background
    image[:, :, 12:36, 8:32] = torch.tensor([1.0, 0.1, 0.0]).view(1, 3, 1, 1)  # red object
    image += 0.05 * torch.randn(image.shape, generator=gen)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    blob = torch.exp(-((yy - 24.0) ** 2 + (xx - 20.0) ** 2) / (2 * 6.0 ** 2))
    maps = (blob + 0.05 * torch.rand(2, h, w, generator=gen))
    truth = torch.zeros(h, w, dtype=torch.bool)
    truth[12:36, 8:32] = True

    def iou(mask: torch.Tensor) -> float:
        return float((mask & truth).sum() / (mask | truth).sum())

    refined = grabcut_mask(image, maps)
    assert refined.shape == (2, h, w) and refined.dtype == torch.bool
    plain = quantile_mask(maps, 0.95)
    for i in range(2):
        assert iou(refined[i]) > 0.9
        assert iou(plain[i]) < 0.3
    box = torch.tensor([[8, 12, 32, 36]])
    ys, xs = torch.nonzero(refined[0], as_tuple=True)
    found = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]])
    assert box_iou(found, box).item() > 0.9


def test_grabcut_with_a_flat_map_falls_back_to_the_seeds() -> None:
    image = torch.rand(1, 3, 16, 16)
    maps = torch.ones(1, 16, 16)
    assert grabcut_mask(image, maps).all()
    with pytest.raises(PipelineError, match="bg_quantile"):
        grabcut_mask(image, maps, fg_quantile=0.3, bg_quantile=0.5)
    with pytest.raises(PipelineError, match="same size"):
        grabcut_mask(image, torch.ones(1, 8, 8))


def test_smoothgrad_batches_noisy_copies_without_changing_the_result() -> None:
    torch.manual_seed(0)
    digits = DigitsCNN(width=8).eval()
    x = torch.randn(3, 1, 64, 64)
    targets = [1, 4, 7]
    one_by_one = saliency(digits, x, targets, samples=5, seed=2, batch_size=1).grad
    for batch_size in (3, 7, 64):   # 1, 2 and 5 noisy copies of the 3 images per pass
        batched = saliency(digits, x, targets, samples=5, seed=2, batch_size=batch_size).grad
        torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-7)
    # the same as averaging single-image input gradients over the same noise draws: each image's
    # copies come from its own generator, so an image's map does not depend on its batch
    gens = [torch.Generator().manual_seed(2) for _ in range(3)]
    sigma = 0.15 * (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(-1, 1, 1, 1)
    manual = sum(input_gradient(digits, x + sigma * torch.stack([torch.randn(x.shape[1:], generator=g)
                                                                 for g in gens]), targets)
                 for _ in range(5)) / 5
    torch.testing.assert_close(one_by_one, manual, rtol=1e-5, atol=1e-7)
    alone = saliency(digits, x[1:2], targets[1], samples=5, seed=2).grad
    torch.testing.assert_close(alone, one_by_one[1:2], rtol=1e-5, atol=1e-7)
    with pytest.raises(PipelineError, match="2 target classes for 3 images"):
        saliency(digits, x, [1, 2], samples=2)
