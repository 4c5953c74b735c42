"""Methods that explain by many masked forward passes: Score-CAM, Ablation-CAM and RISE.

Score-CAM (Wang et al. 2020) and Ablation-CAM (Desai & Ramaswamy 2020) are
:class:`~pipeline.methods.base.LayerMethod` s that weight one layer's channels by forward passes
instead of gradients; pytorch-grad-cam's classes are their parity reference (its maps are ours
min-max scaled). RISE (Petsiuk et al. 2018) averages random coarse masks by the target's
probability on the image they mask, as the authors' code (github.com/eclique/RISE) does.

All three are exact up to float rounding, with the work cut where that keeps the result: masked
batches run in ``channels_last`` on CPU (faster convolutions) and, for Score-CAM and RISE, through
a copy of the model with its BatchNorms folded into the convs; Score-CAM runs one forward pass for
all channels whose mask is zero, and Ablation-CAM runs the network before the layer once per batch
of ablated copies instead of once per copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.errors import PipelineError
from pipeline.methods.base import Explanation, LayerMethod, MapMethod
from pipeline.methods.execution import Runner
from pipeline.methods.hooks import Target, check_target, get_layer, replacing_outputs


def channel_maps(act: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Maps (n,h,w) resized to ``size`` as Score-CAM does (bilinear, ``align_corners=True``)."""
    return F.interpolate(act[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]


@torch.no_grad()
def score_cam_scores(model: nn.Module, x: torch.Tensor, t: torch.Tensor, act: torch.Tensor,
                     batch_size: int = 16, low_precision: bool = False) -> torch.Tensor:
    """The target logit (B,C) on each image times each channel's upsampled, min-max normalised map
    (the masked passes in bfloat16 with ``low_precision``, where that is native).

    A constant channel's mask is zero, so its masked image is the zero image whatever the input:
    one forward pass gives the score of all of them.
    """
    b, c = act.shape[:2]
    size = (x.shape[-2], x.shape[-1])
    flat = act.flatten(0, 1)
    spans = [channel_maps(flat[i:i + batch_size], size).flatten(1).aminmax(dim=1)
             for i in range(0, b * c, batch_size)]
    lo = torch.cat([s.min for s in spans])
    hi = torch.cat([s.max for s in spans])
    constant = hi == lo
    active = (~constant).nonzero()[:, 0]
    run = Runner(model, x[:1], low_precision=low_precision)
    scores = torch.empty(b * c, dtype=act.dtype, device=act.device)
    for i in range(0, active.numel(), batch_size):
        idx = active[i:i + batch_size]
        image = idx // c
        masks = (channel_maps(flat[idx], size) - lo[idx, None, None]) / (hi - lo + 1e-8)[idx, None, None]
        logits = run(x[image] * masks[:, None])
        scores[idx] = logits.gather(1, t[image, None])[:, 0].to(scores.dtype)
    if active.numel() < b * c:
        zero = run(torch.zeros_like(x[:1]))[0]
        idx = constant.nonzero()[:, 0]
        scores[idx] = zero[t[idx // c]].to(scores.dtype)
    return scores.view(b, c)


class ScoreCAM(LayerMethod):
    """Weights: the softmax over channels of the target logit on the image masked by each
    channel's map (upsampled with ``align_corners=True`` and min-max normalised, as the reference)."""

    name = "scorecam"
    fast_model = False  # its masked passes run on a Runner of their own
    title = "Score-CAM"
    uses_gradients = False
    DEFAULTS = {**LayerMethod.DEFAULTS, "low_precision": False}
    OPTIONS = {"batch_size": 16}
    many_passes = True
    description = "channels weighted by the target's score on the image masked by each (Wang et al. 2020)"

    def validate(self) -> None:
        self._positive("batch_size", store=self.options)
        self._flag("low_precision")

    def cam(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, act: torch.Tensor,
            grad: torch.Tensor | None) -> torch.Tensor:
        scores = score_cam_scores(model, x, t, act, self.options["batch_size"], self.settings["low_precision"])
        return torch.einsum("bc,bchw->bhw", torch.softmax(scores, dim=1), act)


class Ablation:
    """Forward hook that replaces a layer's output by copies of it, copy j with channel
    ``channels[j]`` set to zero (none where it is -1). The output has batch 1 when the network
    before the layer ran on one image (the copies then flow through the rest only) or a batch of
    ``len(channels)`` identical images."""

    def __init__(self) -> None:
        self.channels = torch.empty(0, dtype=torch.long)

    def __call__(self, _module: nn.Module, _inputs: object, out: torch.Tensor) -> torch.Tensor:
        copies = out.expand(len(self.channels), *out.shape[1:]).clone()  # keeps channels_last
        channels = self.channels.to(out.device)
        rows = (channels >= 0).nonzero()[:, 0]
        copies[rows, channels[rows]] = 0
        return copies


@torch.no_grad()
def ablation_scores(model: nn.Module, layer: str, x: torch.Tensor, t: torch.Tensor, channels: int,
                    batch_size: int = 64) -> torch.Tensor:
    """Target logits (B, 1 + channels): column 0 unablated, column 1 + c with channel c of
    ``layer``'s output set to zero.

    Each batch of copies runs the network before the layer on the one image and the rest on the
    copies. A network that combines the layer's output with a tensor from before it in a way that
    needs equal batch sizes (a ``cat``, an in-place add into the earlier tensor) fails or returns
    another batch size; it then gets full copies of the image for the rest of the call.
    """
    ablate = Ablation()
    order = torch.arange(-1, channels)
    run = Runner(model, x[:1], fold=False)  # the hook is on the model's own layer
    full = False
    scores = torch.empty(x.shape[0], channels + 1, dtype=x.dtype, device=x.device)
    with replacing_outputs([get_layer(model, layer)], ablate):
        for b in range(x.shape[0]):
            xb = x[b:b + 1]
            for i in range(0, channels + 1, batch_size):
                ablate.channels = order[i:i + batch_size]
                n = len(ablate.channels)
                if not full:
                    try:
                        logits = run(xb)
                        full = logits.shape[0] != n
                    except RuntimeError:
                        full = True
                if full:
                    logits = run(xb.expand(n, -1, -1, -1))
                scores[b, i:i + n] = logits[:, t[b]].to(scores.dtype)
    return scores


class AblationCAM(LayerMethod):
    """Weights: the target logit's relative drop, (score - score with channel c of the layer's
    output set to zero) / score."""

    name = "ablationcam"
    fast_model = False  # its masked passes run on a Runner of their own
    title = "Ablation-CAM"
    uses_gradients = False
    OPTIONS = {"batch_size": 64}
    many_passes = True
    description = "channels weighted by the score's drop when each is zeroed (Desai & Ramaswamy 2020)"

    def validate(self) -> None:
        self._positive("batch_size", store=self.options)

    def cam(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, act: torch.Tensor,
            grad: torch.Tensor | None) -> torch.Tensor:
        scores = ablation_scores(model, self.layer, x, t, act.shape[1], self.options["batch_size"])
        base = scores[:, :1]
        weights = (base - scores[:, 1:]) / base
        return torch.einsum("bc,bchw->bhw", weights.to(act.dtype), act)


def _mirror(index: torch.Tensor, n: int) -> torch.Tensor:
    """Indices reflected into 0..n-1 about the edge samples (scipy.ndimage's ``mirror`` mode)."""
    if n == 1:
        return torch.zeros_like(index)
    period = 2 * n - 2
    index = index.remainder(period)
    return torch.where(index >= n, period - index, index)


def _shifted_resize(cells: int, size: int) -> torch.Tensor:
    """(cell, size, cells) float64 matrices, one per shift d: row r interpolates pixel r + d of the
    ``cells`` samples resized to (cells + 1) * cell pixels, cell = ceil(size / cells).

    This is the authors' ``skimage.transform.resize(order=1, mode='reflect')``: bilinear with
    half-pixel centres, edges mirrored.
    """
    cell = math.ceil(size / cells)
    up = (cells + 1) * cell
    pos = torch.arange(size, dtype=torch.float64)[None] + torch.arange(cell, dtype=torch.float64)[:, None]
    src = (pos + 0.5) * (cells / up) - 0.5
    low = src.floor()
    frac = src - low
    low = low.long()
    out = torch.zeros(cell, size, cells, dtype=torch.float64)
    out.scatter_add_(2, _mirror(low, cells)[..., None], (1 - frac)[..., None])
    out.scatter_add_(2, _mirror(low + 1, cells)[..., None], frac[..., None])
    return out


@dataclass
class RiseMasks:
    """RISE's N masks for (H, W) inputs, drawn by a CPU generator from ``seed``: a cells x cells
    grid of cells kept with probability p, resized bilinearly to (cells + 1) x the cell size and
    cropped at a random shift of less than one cell. :meth:`chunk` builds masks i..j on demand,
    so all N need not be in memory."""

    grid: torch.Tensor      # (N, cells, cells) 0/1
    shift_y: torch.Tensor   # (N,) crop offsets in pixels
    shift_x: torch.Tensor
    rows: torch.Tensor      # (cell_h, H, cells) interpolation per row shift
    cols: torch.Tensor      # (cell_w, W, cells)

    @classmethod
    def draw(cls, count: int, cells: int, p: float, seed: int, size: tuple[int, int]) -> RiseMasks:
        height, width = size
        gen = torch.Generator().manual_seed(seed)
        grid = (torch.rand(count, cells, cells, generator=gen) < p).double()
        shift_y = torch.randint(0, math.ceil(height / cells), (count,), generator=gen)
        shift_x = torch.randint(0, math.ceil(width / cells), (count,), generator=gen)
        return cls(grid, shift_y, shift_x, _shifted_resize(cells, height), _shifted_resize(cells, width))

    def __len__(self) -> int:
        return self.grid.shape[0]

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        """Masks start..stop-1 (n, H, W) in [0, 1], float32 (from float64 products, so that no
        summation order shows)."""
        rows = self.rows[self.shift_y[start:stop]]
        cols = self.cols[self.shift_x[start:stop]]
        return (rows @ self.grid[start:stop] @ cols.transpose(1, 2)).float()


def rise_masks(count: int, cells: int, p: float, seed: int, size: tuple[int, int]) -> torch.Tensor:
    """All RISE masks (N, H, W): the same for the same arguments on every device."""
    return RiseMasks.draw(count, cells, p, seed, size).chunk(0, count)


@torch.no_grad()
def rise(model: nn.Module, x: torch.Tensor, t: torch.Tensor, masks: RiseMasks, p: float,
         batch_size: int = 16, low_precision: bool = False) -> torch.Tensor:
    """RISE maps (B,H,W): sum_i softmax(model(x * M_i))[target] * M_i / (N p), the masked passes
    in bfloat16 with ``low_precision`` (where that is native)."""
    run = Runner(model, x[:1], low_precision=low_precision)
    total = torch.zeros(x.shape[0], x.shape[-2] * x.shape[-1], dtype=x.dtype, device=x.device)
    for i in range(0, len(masks), batch_size):
        m = masks.chunk(i, i + batch_size).to(device=x.device, dtype=x.dtype)
        for b in range(x.shape[0]):
            probs = torch.softmax(run(x[b:b + 1] * m[:, None]), dim=1)[:, t[b]]
            total[b] += probs.to(x.dtype) @ m.flatten(1)
    return (total / (len(masks) * p)).view(x.shape[0], *x.shape[-2:])


class RISE(MapMethod):
    """Randomized input sampling: each pixel's expected target probability over random coarse
    masks that keep it (Petsiuk et al. 2018)."""

    name = "rise"
    title = "RISE"
    DEFAULTS = {"masks": 2000, "cells": 8, "p": 0.5, "seed": 0, "low_precision": True}
    OPTIONS = {"batch_size": 16}
    many_passes = True
    description = "target probability averaged over random coarse masks (Petsiuk et al. 2018)"

    def validate(self) -> None:
        self._positive("masks", "cells")
        self._positive("batch_size", store=self.options)
        p = self.settings["p"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise PipelineError(f"explain.rise.p must be a probability in (0, 1] (the chance each grid "
                                f"cell is kept), got {p!r}; the paper uses 0.5.")
        self.settings["p"] = float(p)
        seed = self.settings["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise PipelineError(f"explain.rise.seed must be an integer, got {seed!r}.")
        self._flag("low_precision")

    def attribute(self, model: nn.Module, x: torch.Tensor, target: Target) -> Explanation:
        s = self.settings
        with torch.no_grad():
            t = check_target(target, model(x[:1]).shape[1], x.shape[0]).to(x.device)
        masks = RiseMasks.draw(s["masks"], s["cells"], s["p"], s["seed"], (x.shape[-2], x.shape[-1]))
        maps = rise(model, x, t, masks, s["p"], self.options["batch_size"], s["low_precision"])
        return Explanation(maps)
