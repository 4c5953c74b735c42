"""Approximate occlusion after Krypton: adaptive drill-down over the position grid, the projective-
field threshold and bfloat16 convolutions of the patch's change (``ApproximateEngine``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.methods.execution import low_precision_active
from pipeline.methods.occlusion.krypton import IncrementalEngine


# ----------------------------------------------------------------------------------------------
# Approximate occlusion


CROSS = ((-1, 0), (1, 0), (0, -1), (0, 1))
DIAGONAL = ((-1, -1), (-1, 1), (1, -1), (1, 1))


def neighbours(values: torch.Tensor, known: torch.Tensor,
                offsets: tuple[tuple[int, int], ...] = CROSS
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Over the known neighbours (``offsets``: the 4 across, or the 4 diagonal) of every cell of a
    (gh, gw, ...) grid: the mean of ``values`` (gh, gw, ...), and the max and min of
    ``values[..., 0]`` (gh, gw); cells without a known neighbour get 0, -inf and inf."""
    gh, gw = known.shape
    total = torch.zeros_like(values)
    count = torch.zeros(gh, gw, dtype=values.dtype)
    high = torch.full((gh, gw), -math.inf, dtype=values.dtype)
    low = torch.full((gh, gw), math.inf, dtype=values.dtype)
    for dy, dx in offsets:
        r0, r1, c0, c1 = max(0, -dy), min(gh, gh - dy), max(0, -dx), min(gw, gw - dx)
        if r0 >= r1 or c0 >= c1:
            continue
        near = values[r0 + dy:r1 + dy, c0 + dx:c1 + dx]
        ok = known[r0 + dy:r1 + dy, c0 + dx:c1 + dx]
        first = near.reshape(r1 - r0, c1 - c0, -1)[..., 0]
        total[r0:r1, c0:c1] += near * ok.view(*ok.shape, *[1] * (values.dim() - 2))
        count[r0:r1, c0:c1] += ok
        high[r0:r1, c0:c1] = torch.where(ok, torch.maximum(high[r0:r1, c0:c1], first),
                                         high[r0:r1, c0:c1])
        low[r0:r1, c0:c1] = torch.where(ok, torch.minimum(low[r0:r1, c0:c1], first),
                                        low[r0:r1, c0:c1])
    mean = total / count.clamp(min=1).view(gh, gw, *[1] * (values.dim() - 2))
    return mean, high, low


def interpolation_fit(prob: torch.Tensor, known: torch.Tensor) -> float:
    """How well neighbour interpolation predicts this heat map, in [0, 1]: the fraction of the
    variance of the known cells of ``prob`` (gh, gw) that predicting each from the mean of its
    known diagonal neighbours explains (1 - residual variance / variance; 0 for a constant map).

    On a checkerboard the diagonal neighbours of a known cell are known, so this is measured on
    evaluated positions only, at twice the distance an estimate spans (its residual variance came
    out about twice the estimates' on ResNet-18, VGG-11 and EfficientNet-Lite0): a smooth map
    scores near 1, noise near 0."""
    mean, high, _ = neighbours(prob.unsqueeze(-1), known, DIAGONAL)
    inner = known & high.isfinite()  # known cells with a known diagonal neighbour
    values = prob[known]
    spread = float(((values - values.mean()) ** 2).mean())
    if spread == 0 or not inner.any():
        return 0.0
    residual = float(((prob - mean[..., 0])[inner] ** 2).mean())
    return max(0.0, 1.0 - residual / spread)


def drill_down(evaluate: Callable[[torch.Tensor], torch.Tensor], grid: tuple[int, int],
               target: int, tolerance: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive drill-down over a (gh, gw) grid of positions (row-major), decided by the map.

    ``evaluate(indices) -> logits (n, K)`` computes positions exactly. Half the positions, a
    checkerboard, are evaluated first; each other position is estimated as the mean of its
    evaluated 4-neighbours' logits, and evaluated exactly when the target probability varies
    across those neighbours by more than ``tolerance x fit x range``: range is that of the
    probabilities evaluated so far, fit is :func:`interpolation_fit` of the checkerboard. A map
    that interpolation predicts well (smooth) is refined only at its sharpest edges; a rough one,
    whose estimates are poor everywhere, almost everywhere. A checkerboard keeps every estimate
    one step from a sample on each side, which a coarse grid (every other row and column) does
    not. Returns logits (P, K) and the evaluated indices (sorted).
    """
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    known = (rows + cols) % 2 == 0
    first = known.reshape(-1).nonzero().squeeze(1)
    first_logits = evaluate(first)
    logits = torch.zeros(gh * gw, first_logits.shape[1], dtype=first_logits.dtype)
    logits[first] = first_logits
    prob = torch.zeros(gh * gw, dtype=torch.float64)
    prob[first] = torch.softmax(first_logits.double(), dim=1)[:, target]
    grid_logits = logits.view(gh, gw, -1)
    mean, high, low = neighbours(torch.cat([prob.view(gh, gw, 1), grid_logits.double()], 2),
                                  known)
    scale = float(prob[first].max() - prob[first].min())
    threshold = tolerance * interpolation_fit(prob.view(gh, gw), known) * scale
    rest = ~known
    grid_logits[rest] = mean[..., 1:][rest].to(logits.dtype)
    refine = (rest & (high - low > threshold)).reshape(-1).nonzero().squeeze(1)
    if len(refine):
        logits[refine] = evaluate(refine)
    return logits, torch.cat([first, refine]).sort().values


class ApproximateEngine(IncrementalEngine):
    """Approximate occlusion: adaptive drill-down (``tolerance``, see :func:`drill_down`),
    Krypton's projective-field threshold ``tau`` (see ``cap_box``) and convolutions of the patch's
    change in bfloat16 (``low_precision``).

    ``low_precision`` uses conv(x + d) = conv(x) + conv(d) - bias: only the change d is rounded,
    so the error scales with the change (about 1% of the score range measured on ResNet-18,
    VGG-11 and EfficientNet-Lite0; heat-map SSIM 0.9998) and the dense convolutions run at
    bfloat16 speed (about twice float32 on CPUs with native bfloat16; ignored where it is not
    native, and for depthwise convolutions, which are memory-bound).

    Defaults (``DEFAULTS``, one set for every model) were chosen on ResNet-18 and VGG-11 (random
    weights: rough maps, fit 0.46 and 0.20) and EfficientNet-Lite0 (pretrained: smooth, fit 0.60),
    224x224, window 16, stride 8: heat-map SSIM 0.91-0.95 against exact occlusion, 0.52-0.92 of the
    positions evaluated (the rougher the map, the more). ``tau=None`` and ``tolerance=None``
    turn the two approximations off.

    ``occlusion`` calls :meth:`grid_logits`; called directly with boxes it applies only ``tau``
    and ``low_precision``. After a run, ``evaluated`` holds the indices of the positions that
    were computed.
    """

    DEFAULTS: dict[str, Any] = {"tolerance": 0.7, "tau": 0.4, "low_precision": True}

    def __init__(self, model: nn.Module, x: torch.Tensor, tolerance: float | None = 0.7,
                 tau: float | None = 0.4, low_precision: bool = True) -> None:
        if tolerance is not None and not tolerance >= 0:
            raise PipelineError(f"Approximate occlusion tolerance must be >= 0 (or None to "
                                f"evaluate every position), got {tolerance}. Fix: use e.g. "
                                "tolerance=0.7.")
        super().__init__(model, x, tau)
        self.tolerance = None if tolerance is None else float(tolerance)
        if low_precision and low_precision_active(x.device):
            self._low = torch.bfloat16
        self.low_precision = self._low is not None  # whether the bfloat16 path is active
        self.evaluated = torch.zeros(0, dtype=torch.long)

    def grid_logits(self, boxes: torch.Tensor, grid: tuple[int, int], fill: torch.Tensor,
                    target: int, batch_size: int) -> torch.Tensor:
        """Logits (P, K) for every position of the grid, some of them estimated."""
        self.precompute(boxes)
        if self.tolerance is None:
            self.evaluated = torch.arange(len(boxes))
            return self._batches(boxes, fill, batch_size)
        logits, self.evaluated = drill_down(
            lambda index: self._batches(boxes[index], fill, batch_size), grid, target,
            self.tolerance)
        return logits
