"""The pictures module: one un-normalisation, antialiased downscaling, outlines, strips and grids."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipeline.pictures import as_rgb, display_image, grid, map_strip, outline, resize, unnormalize


def test_unnormalize_inverts_the_model_normalisation_and_clamps() -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    rgb = torch.rand(2, 3, 5, 7)
    x = (rgb - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    assert torch.allclose(unnormalize(x, mean, std), rgb, atol=1e-6)
    assert unnormalize(torch.full((1, 2, 2), 50.0), (0.5,), (0.5,)).max() == 1.0
    shown = display_image(x[0], mean, std)
    assert shown.dtype == np.uint8 and shown.shape == (5, 7, 3)
    assert np.abs(shown.astype(int) - np.round(rgb[0].permute(1, 2, 0).numpy() * 255)).max() <= 1


def test_grayscale_is_shown_as_rgb() -> None:
    grey = torch.rand(1, 4, 4)
    assert as_rgb(grey).shape == (3, 4, 4) and torch.equal(as_rgb(grey)[2], grey[0])
    assert display_image(grey, (0.0,), (1.0,)).shape == (4, 4, 3)


def test_downscaling_antialiases_a_fine_checkerboard() -> None:
    # a 1-pixel checkerboard shrunk 4x is flat grey when antialiased; point sampling would alias it
    board = ((torch.arange(64)[:, None] + torch.arange(64)[None]) % 2).float().expand(1, 3, 64, 64)
    small = resize(board, (16, 16))
    assert small.shape == (1, 3, 16, 16)
    assert torch.allclose(small, torch.full_like(small, 0.5), atol=0.02)


def test_outline_draws_the_mask_edge_only() -> None:
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    out = np.asarray(outline(Image.new("RGB", (16, 16), "black"), mask))
    green = (out == (0, 255, 0)).all(axis=2)
    assert green[4:6, 4:12].all() and green[4:12, 4:6].all()  # the edge ring, scaled 2x
    assert not green[6:10, 6:10].any() and not green[:4].any()  # not the inside, not outside


def test_map_strip_and_grid_sizes() -> None:
    strip = map_strip(np.random.default_rng(0).random((3, 8, 8)), tile=20, gap=2)
    assert strip.size == (3 * 20 + 2 * 2, 20)
    g = grid([torch.rand(1, 8, 8), torch.rand(3, 16, 16)], nrow=2)
    assert g.shape == (3, 16 + 4, 2 * 16 + 6)  # the small grey picture enlarged and shown in colour
