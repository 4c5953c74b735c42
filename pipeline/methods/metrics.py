"""Explanation-quality metrics: pointing game, box IoU, deletion and insertion AUC, centre baseline.

Boxes are ``(x0, y0, x1, y1)`` in pixels with x1 and y1 exclusive; maps are (B,H,W).
Deletion and insertion follow RISE (Petsiuk et al. 2018): pixels are removed from (deletion) or
added to (insertion) the image in order of decreasing saliency in ``steps`` equal steps, and the
area under the target class's probability curve over the fraction changed (x in [0, 1]) is the
score: low is good for deletion, high is good for insertion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.errors import PipelineError
from pipeline.methods.blur import gaussian_blur
from pipeline.methods.hooks import Target, check_target

Baseline = str | torch.Tensor


def pointing_tolerance(height: int, width: int) -> float:
    """TorchRay's 15 px tolerance at 224 px, scaled to the image: 15 * min(H, W) / 224."""
    return 15.0 * min(height, width) / 224.0


def pointing_game(maps: torch.Tensor, boxes: torch.Tensor | Sequence[torch.Tensor],
                  tolerance: float | None = None) -> torch.Tensor:
    """Hits (bool, B): the map's argmax lies in one of the image's boxes grown by ``tolerance`` px.

    ``boxes`` is (B,4) with one box per image, or a sequence of (M_i,4) tensors; an image with no
    box is a miss. ``tolerance`` defaults to :func:`pointing_tolerance`.
    """
    b, h, w = maps.shape
    tol = pointing_tolerance(h, w) if tolerance is None else tolerance
    per_image = list(boxes[:, None]) if isinstance(boxes, torch.Tensor) else list(boxes)
    if len(per_image) != b:
        raise PipelineError(f"pointing_game got {len(per_image)} box sets for {b} maps.")
    flat_arg = maps.detach().flatten(1).argmax(1).cpu()
    hits = []
    for idx, box in zip(flat_arg.tolist(), per_image):
        py, px = divmod(idx, w)
        box = torch.as_tensor(box, dtype=torch.float64).reshape(-1, 4).cpu()
        inside = ((box[:, 0] - tol <= px) & (px <= box[:, 2] - 1 + tol)
                  & (box[:, 1] - tol <= py) & (py <= box[:, 3] - 1 + tol))
        hits.append(bool(inside.any()))
    return torch.tensor(hits)


def box_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Object masks (B,H,W) bool of boxes (B,4) ``(x0, y0, x1, y1)``: a pixel is inside when its
    centre is (fractional boxes, as a resize leaves them, cover the pixels they mostly cover)."""
    b = boxes.double().reshape(-1, 4)
    ys = torch.arange(height, dtype=torch.float64, device=b.device) + 0.5
    xs = torch.arange(width, dtype=torch.float64, device=b.device) + 0.5
    in_y = (b[:, 1, None] <= ys) & (ys < b[:, 3, None])
    in_x = (b[:, 0, None] <= xs) & (xs < b[:, 2, None])
    return in_y[:, :, None] & in_x[:, None, :]


def inside_energy(maps: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
    """Share of each map's positive attribution inside its object mask (B,), the energy-based
    pointing game of Score-CAM (Wang et al. 2020); NaN for a map with no positive mass."""
    pos = maps.detach().double().clamp_min(0).flatten(1)
    total = pos.sum(1)
    inside = (pos * objects.flatten(1).to(pos)).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-300), torch.full_like(total, math.nan))


def pointing_mask(maps: torch.Tensor, objects: torch.Tensor, tolerance: float | None = None) -> torch.Tensor:
    """Hits (bool, B): each map's argmax lies within ``tolerance`` px (a square window; default
    :func:`pointing_tolerance`) of its object mask: the pointing game for objects given as masks.
    One integral image per mask counts the object pixels in each argmax's window."""
    b, h, w = maps.shape
    tol = int(round(pointing_tolerance(h, w) if tolerance is None else tolerance))
    integral = F.pad(objects.to(torch.int32).cumsum(1).cumsum(2), (1, 0, 1, 0))
    flat = maps.detach().flatten(1).argmax(1).to(objects.device)
    py, px = flat // w, flat % w
    y0, y1 = (py - tol).clamp(0, h), (py + tol + 1).clamp(0, h)
    x0, x1 = (px - tol).clamp(0, w), (px + tol + 1).clamp(0, w)
    i = torch.arange(b, device=objects.device)
    count = integral[i, y1, x1] - integral[i, y0, x1] - integral[i, y1, x0] + integral[i, y0, x0]
    return count > 0


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise intersection over union (N,M) of boxes a (N,4) and b (M,4); empty union gives 0."""
    a, b = a.double().reshape(-1, 4), b.double().reshape(-1, 4)
    lo = torch.maximum(a[:, None, :2], b[None, :, :2])
    hi = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (hi - lo).clamp_min(0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp_min(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp_min(0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(union))


def center_map(height: int, width: int) -> torch.Tensor:
    """A baseline map (H,W) peaking at the image centre, falling linearly to 0 at the corners."""
    ys = torch.arange(height, dtype=torch.float32) - (height - 1) / 2
    xs = torch.arange(width, dtype=torch.float32) - (width - 1) / 2
    dist = torch.sqrt(ys[:, None] ** 2 + xs[None, :] ** 2)
    return 1 - dist / dist.max().clamp_min(1e-12)


def baseline_image(x: torch.Tensor, baseline: Baseline, blur_sigma: float | None = None
                   ) -> torch.Tensor:
    """The image that removed pixels take: 'zero' (the dataset mean for normalised inputs),
    'mean' (each image's channel means), 'blur' (Gaussian blur, sigma defaults to min(H,W)/16)
    or an explicit tensor broadcastable to ``x``."""
    if isinstance(baseline, torch.Tensor):
        return baseline.to(x).expand_as(x)
    if baseline == "zero":
        return torch.zeros_like(x)
    if baseline == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    if baseline == "blur":
        sigma = min(x.shape[-2:]) / 16 if blur_sigma is None else blur_sigma
        return gaussian_blur(x, sigma)
    raise PipelineError(f"Unknown baseline '{baseline}'; use 'zero', 'mean', 'blur' or a tensor.")


class CurveResult(NamedTuple):
    """``auc`` (B,): trapezoid area under ``curve`` (B, steps+1), the target's probability at each
    step, with x evenly spaced over [0, 1]."""

    auc: torch.Tensor
    curve: torch.Tensor


def trapezoid_auc(curve: torch.Tensor) -> torch.Tensor:
    """Area under curves (B, S+1) sampled evenly over x in [0, 1]."""
    steps = curve.shape[1] - 1
    return (curve[:, :-1] + curve[:, 1:]).sum(1) / (2 * steps)


def _probability_curve(model: nn.Module, start: torch.Tensor, end: torch.Tensor,
                       target: Target, maps: torch.Tensor, steps: int,
                       batch_size: int) -> CurveResult:
    """Probability of the target as the most salient pixels switch from ``start`` to ``end``."""
    b, _, h, w = start.shape
    if maps.shape != (b, h, w):
        raise PipelineError(f"Maps of shape {tuple(maps.shape)} do not match images "
                            f"{tuple(start.shape)}; need (B,H,W).")
    if steps < 1 or batch_size < 1:
        raise PipelineError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}.")
    n = h * w
    order = torch.argsort(maps.detach().flatten(1).to(start.device), dim=1, descending=True,
                          stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=start.device).expand(b, n))
    rank = rank.view(b, 1, h, w)
    counts = torch.round(torch.arange(steps + 1, device=start.device) * (n / steps)).long()
    probs = torch.empty(b * (steps + 1), device=start.device)
    t = None
    with torch.no_grad():
        for first in range(0, b * (steps + 1), batch_size):
            j = torch.arange(first, min(first + batch_size, b * (steps + 1)), device=start.device)
            img, step = j // (steps + 1), j % (steps + 1)
            switched = rank[img] < counts[step].view(-1, 1, 1, 1)
            logits = model(torch.where(switched, end[img], start[img]))
            if t is None:
                t = check_target(target, logits.shape[1], b).to(logits.device)
            probs[first:first + len(j)] = logits.softmax(1).gather(1, t[img][:, None])[:, 0]
    curve = probs.view(b, steps + 1)
    return CurveResult(trapezoid_auc(curve), curve)


def deletion(model: nn.Module, x: torch.Tensor, target: Target, maps: torch.Tensor,
             steps: int = 100, baseline: Baseline = "zero", blur_sigma: float | None = None,
             batch_size: int = 64) -> CurveResult:
    """Deletion game: replace the most salient pixels by ``baseline`` first; lower AUC is better."""
    x = x.detach()
    return _probability_curve(model, x, baseline_image(x, baseline, blur_sigma), target, maps,
                              steps, batch_size)


def insertion(model: nn.Module, x: torch.Tensor, target: Target, maps: torch.Tensor,
              steps: int = 100, baseline: Baseline = "blur", blur_sigma: float | None = None,
              batch_size: int = 64) -> CurveResult:
    """Insertion game: start from ``baseline`` and restore the most salient pixels first; higher
    AUC is better."""
    x = x.detach()
    return _probability_curve(model, baseline_image(x, baseline, blur_sigma), x, target, maps,
                              steps, batch_size)
