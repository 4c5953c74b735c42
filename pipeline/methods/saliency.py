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
             noise: float = 0.15, seed: int = 0, batch_size: int = 64) -> SaliencyResult:
    """Saliency of ``target`` for a batch ``x`` (B,C,H,W); one target per image or one for all.

    With ``samples > 0`` this is SmoothGrad: the gradient averaged over ``samples`` copies of each
    image with Gaussian noise whose standard deviation is ``noise`` times that image's value range,
    drawn from a generator seeded with ``seed`` (the same noise on any device). The noisy copies go
    through the model together, up to ``batch_size`` images per pass (as Captum's NoiseTunnel does
    by default), which is what makes SmoothGrad cost less than ``samples`` separate passes.
    """
    if samples < 0 or noise < 0 or batch_size < 1:
        raise PipelineError(
            f"SmoothGrad needs samples >= 0, noise >= 0 and batch_size >= 1, got samples={samples}, "
            f"noise={noise}, batch_size={batch_size}.")
    if samples == 0:
        grad = input_gradient(model, x, target)
    else:
        b = x.shape[0]
        flat = x.detach().flatten(1)
        sigma = (noise * (flat.amax(1) - flat.amin(1))).view(-1, *([1] * (x.dim() - 1)))
        gen = torch.Generator().manual_seed(seed)
        t = torch.as_tensor(target).reshape(-1)
        if t.numel() not in (1, b):
            raise PipelineError(f"Got {t.numel()} target classes for {b} images; give one per "
                                "image or a single class for all.")
        t = t.expand(b)
        grad = torch.zeros_like(x)
        per_pass = max(1, batch_size // b)          # noisy copies of the whole batch per pass
        for start in range(0, samples, per_pass):
            n = min(per_pass, samples - start)
            # one draw per copy, so the noise depends on the seed only, not on batch_size
            eps = torch.stack([torch.randn(x.shape, generator=gen, dtype=x.dtype)
                               for _ in range(n)]).to(x.device)
            noisy = (x.detach()[None] + sigma[None] * eps).flatten(0, 1)
            grad += input_gradient(model, noisy, t.repeat(n)).view(n, *x.shape).sum(0)
        grad /= samples
    return SaliencyResult(grad, grad.abs().amax(1))


def saliency_map(model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    """The (B,H,W) saliency map alone, in the ``(model, x, target) -> map`` form that metrics and
    sanity checks take."""
    return saliency(model, x, target).map
