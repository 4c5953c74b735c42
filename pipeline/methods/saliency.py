"""Gradient saliency (Simonyan et al. 2014) and its SmoothGrad average (Smilkov et al. 2017).

The gradient is of the target class's pre-softmax score with respect to the input image; the map
is its largest absolute value over colour channels.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.methods.hooks import Target, check_target


class SaliencyResult(NamedTuple):
    """``grad``: signed input gradient (B,C,H,W); ``map``: max over channels of |grad| (B,H,W)."""

    grad: torch.Tensor
    map: torch.Tensor


def input_gradient(model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    """d logit[target] / d x for each image (B,C,H,W); one forward and one backward pass."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    t = check_target(target, logits.shape[1], x.shape[0]).to(logits.device)
    score = logits.gather(1, t[:, None]).sum()
    (grad,) = torch.autograd.grad(score, x)
    return grad


def saliency(model: nn.Module, x: torch.Tensor, target: Target, samples: int = 0,
             noise: float = 0.15, seed: int = 0) -> SaliencyResult:
    """Saliency of ``target`` for a batch ``x`` (B,C,H,W); one target per image or one for all.

    With ``samples > 0`` this is SmoothGrad: the gradient averaged over ``samples`` copies of each
    image with Gaussian noise whose standard deviation is ``noise`` times that image's value range,
    drawn from a generator seeded with ``seed`` (the same noise on any device).
    """
    if samples < 0 or noise < 0:
        raise PipelineError(
            f"SmoothGrad needs samples >= 0 and noise >= 0, got samples={samples}, noise={noise}.")
    if samples == 0:
        grad = input_gradient(model, x, target)
    else:
        flat = x.detach().flatten(1)
        sigma = (noise * (flat.amax(1) - flat.amin(1))).view(-1, *([1] * (x.dim() - 1)))
        gen = torch.Generator().manual_seed(seed)
        grad = torch.zeros_like(x)
        for _ in range(samples):
            eps = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
            grad += input_gradient(model, x + sigma * eps, target)
        grad /= samples
    return SaliencyResult(grad, grad.abs().amax(1))


def saliency_map(model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    """The (B,H,W) saliency map alone, in the ``(model, x, target) -> map`` form that metrics and
    sanity checks take."""
    return saliency(model, x, target).map
