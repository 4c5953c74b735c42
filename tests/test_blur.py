"""The one blur equals torchvision's gaussian_blur (reflect padding, 2*ceil(3 sigma)+1 kernel)."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.functional import gaussian_blur as tv_blur

from pipeline.methods.blur import gaussian_blur


@pytest.mark.parametrize("sigma", [0.6, 1.5, 4.0])
def test_matches_torchvision(sigma: float) -> None:
    x = torch.rand(2, 3, 40, 33, generator=torch.Generator().manual_seed(0))
    k = 2 * math.ceil(3 * sigma) + 1
    torch.testing.assert_close(gaussian_blur(x, sigma), tv_blur(x, [k, k], [sigma, sigma]), atol=1e-5, rtol=0)


def test_tiny_images_clip_the_kernel_per_axis() -> None:
    x = torch.rand(1, 1, 3, 20)
    out = gaussian_blur(x, 5.0)  # reflect padding cannot pad 15 rows of a 3-row image
    assert out.shape == x.shape and torch.isfinite(out).all()
    k = [2 * 15 + 1, 2 * 2 + 1]  # torchvision: (x, y) kernel sizes, each clipped to 2 * size - 1
    torch.testing.assert_close(out, tv_blur(x, k, [5.0, 5.0]), atol=1e-5, rtol=0)
    assert gaussian_blur(x, 0) is x
