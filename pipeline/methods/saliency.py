"""Gradient saliency (Simonyan et al. 2014) and its SmoothGrad average (Smilkov et al. 2017).

The gradient is of the target class's pre-softmax score with respect to the input image; the map
is its largest absolute value over colour channels.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.methods.base import Explanation, MapMethod, PassNeeds, SharedPass
from pipeline.methods.execution import layout_of, pass_size
from pipeline.methods.hooks import Target, check_target
from pipeline.methods.stem import split_stem


class SaliencyResult(NamedTuple):
    """``grad``: signed input gradient (B,C,H,W); ``map``: max over channels of |grad| (B,H,W)."""

    grad: torch.Tensor
    map: torch.Tensor


def input_gradient(model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    """d logit[target] / d x for each image (B,C,H,W): a forward and a backward pass per
    :func:`~pipeline.methods.execution.pass_size` images."""
    t_all = check_target(target, None, x.shape[0])
    step = pass_size(model, x)
    grads = []
    for i in range(0, x.shape[0], step):
        part = x[i:i + step].detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(part)
            t = check_target(t_all[i:i + step], logits.shape[1], part.shape[0]).to(logits.device)
            score = logits.gather(1, t[:, None]).sum()
        grads.append(torch.autograd.grad(score, part)[0])
    return grads[0] if len(grads) == 1 else torch.cat(grads)


def saliency(model: nn.Module, x: torch.Tensor, target: Target, samples: int = 0,
             noise: float = 0.15, seed: int = 0, batch_size: int = 64) -> SaliencyResult:
    """Saliency of ``target`` for a batch ``x`` (B,C,H,W); one target per image or one for all.

    With ``samples > 0`` this is SmoothGrad: the gradient averaged over ``samples`` copies of each
    image with Gaussian noise whose standard deviation is ``noise`` times that image's value range,
    drawn for each image from its own generator seeded with ``seed`` (so an image's map is the same
    on any device and in any batch). The noisy copies go through the model together, up to
    ``batch_size`` images per pass (as Captum's NoiseTunnel does by default), which is what makes
    SmoothGrad cost less than ``samples`` separate passes; where the model splits after its first
    conv (:func:`~pipeline.methods.stem.split_stem`), their gradients are summed there and taken
    back through that conv once per image.
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
        gens = [torch.Generator().manual_seed(seed) for _ in range(b)]
        t = torch.as_tensor(target).reshape(-1)
        if t.numel() not in (1, b):
            raise PipelineError(f"Got {t.numel()} target classes for {b} images; give one per "
                                "image or a single class for all.")
        t = t.expand(b)
        # the copies' gradients summed in the input, or (split_stem) at the first conv's output and
        # taken back through that conv once
        stem = split_stem(model)
        layout = layout_of(x)
        total: torch.Tensor | None = None
        per_pass = max(1, batch_size // b)          # noisy copies of the whole batch per pass
        for start in range(0, samples, per_pass):
            n = min(per_pass, samples - start)
            # copy k of image i is the k-th draw of image i's generator, whatever the batching
            eps = torch.stack([torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in gens])
                               for _ in range(n)]).to(x.device)
            noisy = (x.detach()[None] + sigma[None] * eps).flatten(0, 1).contiguous(memory_format=layout)
            if stem is None:
                part = input_gradient(model, noisy, t.repeat(n))
            else:
                with torch.no_grad():
                    noisy = stem.conv(noisy)
                part = input_gradient(stem.rest, noisy, t.repeat(n))
            if total is None:
                total = torch.zeros_like(part[:b])
            for k in range(n):  # copy by copy: a sum over a 5-D channels_last view is slow
                total.add_(part[k * b:(k + 1) * b])
        assert total is not None
        grad = total if stem is None else stem.input_grad(total, x.shape)
        grad /= samples
    return SaliencyResult(grad, grad.abs().amax(1))


def saliency_map(model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    """The (B,H,W) saliency map alone, in the ``(model, x, target) -> map`` form that metrics and
    sanity checks take."""
    return saliency(model, x, target).map


class Saliency(MapMethod):
    """Gradient saliency: max over colour channels of |d score / d x|; the signed gradient is an extra."""

    name = "saliency"
    fast_model = True
    description = "gradient of the target score, max |.| over colour channels (Simonyan et al. 2014)"

    def attribute(self, model: nn.Module, x: torch.Tensor, target: Target) -> Explanation:
        res = saliency(model, x, target)
        return Explanation(res.map, {"grad": res.grad})

    def shared_needs(self) -> PassNeeds | None:
        return PassNeeds(input_grad=True)

    def from_pass(self, model: nn.Module, p: SharedPass) -> Explanation:
        assert p.input_grad is not None
        return Explanation(p.input_grad.abs().amax(1), {"grad": p.input_grad})


class SmoothGrad(MapMethod):
    """Saliency averaged over noisy copies of each image (Smilkov et al. 2017)."""

    name = "smoothgrad"
    fast_model = True
    version = 2  # 2: each image's noise from its own generator
    DEFAULTS = {"samples": 25, "noise": 0.15, "seed": 0}
    OPTIONS = {"batch_size": 64}
    description = "saliency averaged over noisy copies (Smilkov et al. 2017)"

    def validate(self) -> None:
        self._positive("samples")
        self._positive("batch_size", store=self.options)
        if not isinstance(self.settings["noise"], (int, float)) or self.settings["noise"] < 0:
            raise PipelineError(f"explain.smoothgrad.noise must be >= 0, got {self.settings['noise']!r}.")
        self.settings["noise"] = float(self.settings["noise"])
        self.settings["seed"] = int(self.settings["seed"])

    def attribute(self, model: nn.Module, x: torch.Tensor, target: Target) -> Explanation:
        s = self.settings
        res = saliency(model, x, target, samples=s["samples"], noise=s["noise"], seed=s["seed"],
                       batch_size=self.options["batch_size"])
        return Explanation(res.map, {"grad": res.grad})


class InputXGradient(MapMethod):
    """Input times gradient (Shrikumar et al. 2016), summed over colour channels; the per-channel
    attribution (Captum's ``InputXGradient``) is an extra."""

    name = "input_x_gradient"
    fast_model = True
    description = "input times gradient, summed over colour channels"

    def attribute(self, model: nn.Module, x: torch.Tensor, target: Target) -> Explanation:
        attr = x.detach() * input_gradient(model, x, target)
        return Explanation(attr.sum(1), {"attribution": attr})

    def shared_needs(self) -> PassNeeds | None:
        return PassNeeds(input_grad=True)

    def from_pass(self, model: nn.Module, p: SharedPass) -> Explanation:
        assert p.input_grad is not None
        attr = p.x * p.input_grad
        return Explanation(attr.sum(1), {"attribution": attr})
