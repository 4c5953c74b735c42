"""Occlusion patches: the window positions (as Captum's ``Occlusion``), their masks, the fill that
replaces them, the occluded batch, and the per-pixel average of per-window values."""

from __future__ import annotations

import math

import torch

from pipeline.errors import PipelineError, suggest
from pipeline.methods.blur import gaussian_blur

FILLS = ("constant", "mean", "blur")


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    """An int or a (h, w) pair as a pair of ints, or a PipelineError naming ``name``."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise PipelineError(f"Occlusion {name} must be an int or a pair of ints, got {value!r}.")
    return pair  # type: ignore[return-value]


def _axis_starts(size: int, window: int, stride: int) -> list[int]:
    """Window starts along one axis, as Captum: ceil((size - window) / stride) + 1 steps from 0."""
    steps = math.ceil((size - window) / stride) + 1
    return [i * stride for i in range(steps)]


def occlusion_boxes(height: int, width: int, window: int | tuple[int, int],
                    stride: int | tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch boxes (P, 4) as (y0, x0, y1, x1), row-major, and the grid shape (gh, gw).

    Raises a PipelineError for a non-positive window or stride, a window larger than the image,
    or a stride larger than the window (pixels between windows would never be occluded).
    """
    wh, ww = _pair(window, "window")
    sh, sw = _pair(stride, "stride")
    if wh <= 0 or ww <= 0:
        raise PipelineError(f"Occlusion window must be positive, got {(wh, ww)}. Fix: use a window "
                            "of at least 1 pixel, e.g. occlusion.window=16.")
    if sh <= 0 or sw <= 0:
        raise PipelineError(f"Occlusion stride must be positive, got {(sh, sw)}. Fix: use a stride "
                            "between 1 and the window size, e.g. occlusion.stride=8.")
    if wh > height or ww > width:
        raise PipelineError(
            f"Occlusion window {(wh, ww)} is larger than the image ({height}x{width}). Fix: use a "
            f"window of at most {min(height, width)} pixels.")
    for s, w, n, axis in ((sh, wh, height, "height"), (sw, ww, width, "width")):
        if s > w and w < n:
            raise PipelineError(
                f"Occlusion stride {s} is larger than the window {w} along the {axis}, so some "
                "pixels would never be occluded. Fix: use a stride no larger than the window.")
    ys = torch.tensor(_axis_starts(height, wh, sh), dtype=torch.long)
    xs = torch.tensor(_axis_starts(width, ww, sw), dtype=torch.long)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    y0, x0 = gy.reshape(-1), gx.reshape(-1)
    boxes = torch.stack([y0, x0, (y0 + wh).clamp(max=height), (x0 + ww).clamp(max=width)], dim=1)
    return boxes, (len(ys), len(xs))


def box_masks(boxes: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row (P, H) and column (P, W) indicator masks of the boxes; their outer product is the box."""
    rows = torch.arange(height)
    cols = torch.arange(width)
    row_mask = (rows[None] >= boxes[:, 0:1]) & (rows[None] < boxes[:, 2:3])
    col_mask = (cols[None] >= boxes[:, 1:2]) & (cols[None] < boxes[:, 3:4])
    return row_mask, col_mask


def make_fill(x: torch.Tensor, fill: str = "constant", fill_value: float = 0.0,
              blur_sigma: float = 5.0) -> torch.Tensor:
    """The (1, C, H, W) image whose pixels replace the patch: a constant, the per-channel mean of
    ``x``, or a Gaussian-blurred copy of ``x``."""
    if fill == "constant":
        return torch.full_like(x, float(fill_value))
    if fill == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()
    if fill == "blur":
        if not blur_sigma > 0:
            raise PipelineError(f"Occlusion blur_sigma must be positive, got {blur_sigma}. "
                                "Fix: use e.g. blur_sigma=5.0.")
        return gaussian_blur(x, float(blur_sigma))
    raise PipelineError(f"Unknown occlusion fill '{fill}'.{suggest(fill, FILLS)} "
                        f"Fix: use one of {', '.join(FILLS)}.")


def occlude(x: torch.Tensor, fill: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The batch (b, C, H, W) of ``x`` with each box replaced by ``fill``'s pixels."""
    row_mask, col_mask = box_masks(boxes, x.shape[-2], x.shape[-1])
    mask = (row_mask[:, :, None] & col_mask[:, None, :]).unsqueeze(1)
    return torch.where(mask, fill, x)


def window_average(grid_values: torch.Tensor, boxes: torch.Tensor, height: int,
                   width: int) -> torch.Tensor:
    """(H, W) map where each pixel is the mean of the values of the windows covering it (0 where
    none does). Accumulates in float64 so the result matches Captum's running sums closely."""
    row_mask, col_mask = box_masks(boxes, height, width)
    rm, cm = row_mask.double(), col_mask.double()
    values = grid_values.reshape(-1).double()
    total = torch.einsum("p,ph,pw->hw", values, rm, cm)
    count = torch.einsum("ph,pw->hw", rm, cm)
    return torch.where(count > 0, total / count.clamp(min=1), 0.0).float()
