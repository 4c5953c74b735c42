"""Object masks from saliency maps: plain thresholds, and a GrabCut-style colour refinement.

Simonyan et al. (2014) seed GrabCut with the most salient pixels as foreground and the least
salient as background. ``grabcut_mask`` keeps that idea with a lighter model: one Gaussian per
class in colour space, refitted for a few iterations, a local average of the colour posterior
standing in for GrabCut's pairwise smoothness term, then a morphological opening and closing.
All inputs are batched: maps (B,H,W), images (B,C,H,W); masks come back as bool (B,H,W).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.errors import PipelineError
from pipeline.methods.base import Explanation, MapMethod
from pipeline.methods.hooks import Target
from pipeline.methods.saliency import saliency


def _check_fraction(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise PipelineError(f"{name} must be in [0, 1], got {value}.")


def fraction_mask(maps: torch.Tensor, fraction: float = 0.5) -> torch.Tensor:
    """Pixels whose value is at least ``fraction`` of their map's max (none if the max is <= 0)."""
    _check_fraction("fraction", fraction)
    top = maps.flatten(1).amax(1).view(-1, 1, 1)
    return (maps >= fraction * top) & (top > 0)


def quantile_mask(maps: torch.Tensor, quantile: float = 0.9) -> torch.Tensor:
    """Pixels at or above their map's ``quantile`` (0.9 keeps the top 10 %)."""
    _check_fraction("quantile", quantile)
    flat = maps.detach().flatten(1).float()
    return (flat >= torch.quantile(flat, quantile, dim=1)[:, None]).view(maps.shape)


def _gaussian_loglik(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Log-density (B,N) of pixels x (B,N,C) under a Gaussian fitted to the pixels with weight 1."""
    count = weight.sum(1).clamp_min(1.0)
    mean = torch.einsum("bn,bnc->bc", weight, x) / count[:, None]
    centred = x - mean[:, None]
    cov = torch.einsum("bn,bni,bnj->bij", weight, centred, centred) / count[:, None, None]
    total_var = x.var(dim=1, unbiased=False).sum(1).clamp_min(1e-12)
    eye = torch.eye(x.shape[2], dtype=x.dtype, device=x.device)
    cov = cov + (1e-3 * total_var / x.shape[2] + 1e-9)[:, None, None] * eye
    chol = torch.linalg.cholesky(cov)
    z = torch.linalg.solve_triangular(chol, centred.transpose(1, 2), upper=False)
    logdet = 2 * torch.diagonal(chol, dim1=1, dim2=2).log().sum(1)
    return -0.5 * (z.square().sum(1) + logdet[:, None])


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    return F.max_pool2d(mask[:, None].float(), 2 * radius + 1, stride=1, padding=radius)[:, 0] > 0


def _erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    return ~_dilate(~mask, radius)


def grabcut_mask(images: torch.Tensor, maps: torch.Tensor, fg_quantile: float = 0.95,
                 bg_quantile: float = 0.3, iterations: int = 5, smooth: int = 1,
                 cleanup: int = 1) -> torch.Tensor:
    """Foreground mask from a saliency map refined by the image's colours.

    Pixels at or above the ``fg_quantile`` of saliency are fixed foreground and those at or below
    ``bg_quantile`` fixed background; the rest take the class whose colour Gaussian explains them
    better, with the colour posterior averaged over a (2*smooth+1)^2 window (a bounded stand-in
    for GrabCut's pairwise term: a vote of the neighbours, so one extreme pixel cannot flip them).
    The Gaussians are refitted to the labelling for ``iterations`` rounds, then the mask is opened
    and closed with a (2*cleanup+1)^2 square. An image whose map has no spread (no distinct
    seeds) gets its foreground seeds as the mask.
    """
    _check_fraction("fg_quantile", fg_quantile)
    _check_fraction("bg_quantile", bg_quantile)
    if bg_quantile >= fg_quantile:
        raise PipelineError(f"bg_quantile ({bg_quantile}) must be below fg_quantile "
                            f"({fg_quantile}).")
    if iterations < 1 or smooth < 0 or cleanup < 0:
        raise PipelineError("grabcut_mask needs iterations >= 1, smooth >= 0 and cleanup >= 0.")
    if (images.dim() != 4 or maps.dim() != 3 or images.shape[0] != maps.shape[0]
            or images.shape[2:] != maps.shape[1:]):
        raise PipelineError(f"grabcut_mask needs images (B,C,H,W) and maps (B,H,W) of the same "
                            f"size, got {tuple(images.shape)} and {tuple(maps.shape)}.")
    b, c, h, w = images.shape
    x = images.detach().double().flatten(2).transpose(1, 2)
    flat = maps.detach().flatten(1).float()
    levels = torch.quantile(flat, torch.tensor([bg_quantile, fg_quantile], device=flat.device),
                            dim=1)
    fg_seed = flat >= levels[1][:, None]
    bg_seed = (flat <= levels[0][:, None]) & ~fg_seed
    fg, bg = fg_seed, bg_seed
    for _ in range(iterations):
        log_ratio = _gaussian_loglik(x, fg.double()) - _gaussian_loglik(x, bg.double())
        posterior = torch.sigmoid(log_ratio)
        if smooth:
            posterior = F.avg_pool2d(posterior.view(b, 1, h, w), 2 * smooth + 1, stride=1,
                                     padding=smooth, count_include_pad=False).flatten(1)
        fg = ((posterior > 0.5) | fg_seed) & ~bg_seed
        bg = ~fg
    mask = fg.view(b, h, w)
    if cleanup:
        mask = _erode(_dilate(_dilate(_erode(mask, cleanup), cleanup), cleanup), cleanup)
    valid = (fg_seed.any(1) & bg_seed.any(1)).view(b, 1, 1)
    return torch.where(valid, mask, fg_seed.view(b, h, w))


class Segmentation(MapMethod):
    """A foreground mask (1 = object) from the image's gradient saliency map."""

    name = "segmentation"
    DEFAULTS = {"mode": "grabcut", "fg_quantile": 0.95, "bg_quantile": 0.3, "fraction": 0.5, "quantile": 0.9}
    USED = {"grabcut": ("fg_quantile", "bg_quantile"), "fraction": ("fraction",), "quantile": ("quantile",)}
    description = "a foreground mask from the saliency map (GrabCut-style colour refinement or a threshold)"
    produces_mask = True

    def validate(self) -> None:
        self._choice("mode", tuple(self.USED))
        for k in self.USED[self.settings["mode"]]:
            self.settings[k] = float(self.settings[k])
            _check_fraction(f"explain.segmentation.{k}", self.settings[k])

    def key_settings(self) -> dict[str, Any]:
        mode = self.settings["mode"]
        return {"mode": mode, **{k: self.settings[k] for k in self.USED[mode]}, "saliency": {}}

    def attribute(self, model: nn.Module, x: torch.Tensor, target: Target) -> Explanation:
        sal = saliency(model, x, target).map.detach().float().cpu()
        s = self.settings
        if s["mode"] == "grabcut":
            mask = grabcut_mask(x.detach().cpu().float(), sal, s["fg_quantile"], s["bg_quantile"])
        elif s["mode"] == "fraction":
            mask = fraction_mask(sal, s["fraction"])
        else:
            mask = quantile_mask(sal, s["quantile"])
        return Explanation(mask.float().to(x.device))
