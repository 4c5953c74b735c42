"""Integrated Gradients (Sundararajan et al. 2017): the target score's gradient integrated along the
straight path from a baseline image to the image, times (image - baseline).

The integral is Captum's quadrature (``captum.attr._utils.approximation_methods``): the same nodes
and weights for each rule, so the attributions are ``captum.attr.IntegratedGradients``'s. The
B*steps path images go through the model in passes of ``internal_batch_size``, each with one forward
pass and one ``autograd.grad`` of the summed target scores; each pass's gradients are weighted
and added into one sum per image at once, so memory is one pass's graph whatever ``steps`` is.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.methods.base import Explanation, MapMethod
from pipeline.methods.blur import gaussian_blur
from pipeline.methods.execution import Runner
from pipeline.methods.hooks import Target, check_target
from pipeline.methods.stem import split_stem

RULES = ("gausslegendre", "riemann_trapezoid", "riemann_middle", "riemann_left", "riemann_right")
BASELINES = ("zero", "blur", "mean")


class IGResult(NamedTuple):
    """``attribution`` (B,C,H,W); ``score`` and ``baseline_score`` (B,): the target logit at the
    image and at its baseline; ``delta`` (B,): sum(attribution) - (score - baseline_score)."""

    attribution: torch.Tensor
    score: torch.Tensor
    baseline_score: torch.Tensor
    delta: torch.Tensor


def quadrature(rule: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes in [0, 1] and weights (steps,) of ``rule``, as Captum builds them: Gauss-Legendre
    from NumPy's ``leggauss`` rescaled to [0, 1]; Riemann sums with weight 1/steps at float32
    ``linspace`` nodes (halved at both ends for the trapezoid)."""
    if rule not in RULES:
        raise PipelineError(f"unknown integration rule {rule!r}: use one of {', '.join(RULES)}.")
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return torch.from_numpy(0.5 * (1 + nodes)), torch.from_numpy(0.5 * weights)
    if steps < 2:
        raise PipelineError(f"the {rule} rule needs steps >= 2, got {steps}.")
    n = steps
    nodes = {"trapezoid": torch.linspace(0, 1, n), "left": torch.linspace(0, 1 - 1 / n, n),
             "middle": torch.linspace(1 / (2 * n), 1 - 1 / (2 * n), n),
             "right": torch.linspace(1 / n, 1, n)}[rule.split("_")[1]]
    weights = torch.full((n,), 1 / n, dtype=torch.float64)
    if rule == "riemann_trapezoid":
        weights[[0, -1]] /= 2
    return nodes.double(), weights


def make_baseline(x: torch.Tensor, baseline: str, blur_sigma: float = 10.0) -> torch.Tensor:
    """Each image's baseline (B,C,H,W): all zero (the normalisation mean), a Gaussian blur of the
    image, or the image's per-channel mean."""
    if baseline == "zero":
        return torch.zeros_like(x)
    if baseline == "blur":
        return gaussian_blur(x, blur_sigma)
    if baseline == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()
    raise PipelineError(f"unknown baseline {baseline!r}: use one of {', '.join(BASELINES)}.")


def integrated_gradients(model: nn.Module, x: torch.Tensor, target: Target, baseline: torch.Tensor,
                         steps: int = 50, rule: str = "gausslegendre",
                         internal_batch_size: int = 16) -> IGResult:
    """Integrated gradients of ``target`` for a batch ``x`` (B,C,H,W) from ``baseline`` (same shape).

    A pass holds up to ``internal_batch_size`` images at as many consecutive nodes as fit. The path
    runs through the model with its BatchNorms folded, in ``channels_last`` (:class:`~pipeline.methods.execution.Runner`):
    the same gradients, less work per step; from its first conv's output on where the model splits
    there (:func:`~pipeline.methods.stem.split_stem`), with the gradients summed there and taken
    back through that conv once per image.
    """
    x, baseline = x.detach(), baseline.detach().expand_as(x)
    b = x.shape[0]
    nodes, weights = (v.to(x.device, x.dtype) for v in quadrature(rule, steps))
    run = Runner(model, x[:1])
    with torch.no_grad():
        ends = run(torch.cat([x, baseline]))
    layout = run.memory_format
    t = check_target(target, ends.shape[1], b).to(x.device)
    score, baseline_score = ends.gather(1, t.repeat(2)[:, None])[:, 0].split(b)
    diff = x - baseline
    # the path in the input, or (split_stem) at the first conv's output, where it is linear too
    stem = split_stem(run.model)
    if stem is None:
        start_at, step_by, forward = baseline, diff, run
    else:
        with torch.no_grad():
            start_at = stem.conv(baseline.contiguous(memory_format=layout))
            step_by = stem.linear(diff.contiguous(memory_format=layout))
        forward = stem.rest
    total = torch.zeros_like(start_at)
    buf = torch.empty(min(internal_batch_size, b * steps), *start_at.shape[1:], dtype=x.dtype,
                      device=x.device, memory_format=layout)
    group = min(b, internal_batch_size)                # images a pass, at as many steps as fit
    for i in range(0, b, group):
        images = slice(i, min(i + group, b))
        size = images.stop - i
        for s in range(0, steps, internal_batch_size // size):
            n = min(internal_batch_size // size, steps - s)
            path = buf[:n * size]
            torch.addcmul(start_at[images][None], nodes[s:s + n].view(-1, 1, 1, 1, 1), step_by[images][None],
                          out=path.view(n, size, *path.shape[1:]))
            path.requires_grad_(True)
            with torch.enable_grad():
                chunk_score = forward(path).gather(1, t[images].repeat(n)[:, None]).sum()
            (grad,) = torch.autograd.grad(chunk_score, path)
            path.requires_grad_(False)
            for k in range(n):
                total[images].add_(grad[k * size:(k + 1) * size], alpha=float(weights[s + k]))
    if stem is not None:
        total = stem.input_grad(total, x.shape)
    attribution = total.mul_(diff)
    delta = attribution.flatten(1).sum(1) - (score - baseline_score)
    return IGResult(attribution, score, baseline_score, delta)


class IntegratedGradients(MapMethod):
    """Integrated Gradients, summed over colour channels (signed, so each map sums to the score's
    change from the baseline); the per-channel attribution is an extra, the completeness error meta."""

    name = "integrated_gradients"
    DEFAULTS = {"baseline": "zero", "blur_sigma": 10.0, "steps": 50, "method": "gausslegendre"}
    OPTIONS = {"internal_batch_size": 16}
    description = "gradients integrated from a baseline, times the input's difference (Sundararajan et al. 2017)"

    def validate(self) -> None:
        self._choice("baseline", BASELINES)
        self._choice("method", RULES)
        self._positive("steps")
        self._positive("blur_sigma", integer=False)
        self._positive("internal_batch_size", store=self.options)
        s = self.settings
        s["blur_sigma"] = float(s["blur_sigma"])
        if s["method"].startswith("riemann") and s["steps"] < 2:
            raise PipelineError(f"explain.{self.name}.steps must be at least 2 for method={s['method']}, "
                                f"got {s['steps']}; use more steps or method=gausslegendre.")

    def key_settings(self) -> dict[str, object]:
        s = self.settings
        key = {"baseline": s["baseline"], "steps": s["steps"], "method": s["method"]}
        if s["baseline"] == "blur":
            key["blur_sigma"] = s["blur_sigma"]
        return key

    def attribute(self, model: nn.Module, x: torch.Tensor, target: Target) -> Explanation:
        s = self.settings
        res = integrated_gradients(model, x, target, make_baseline(x, s["baseline"], s["blur_sigma"]),
                                   steps=s["steps"], rule=s["method"],
                                   internal_batch_size=self.options["internal_batch_size"])
        meta = [{"convergence_delta": float(d), "score": float(sc), "baseline_score": float(bs)}
                for d, sc, bs in zip(res.delta, res.score, res.baseline_score)]
        return Explanation(res.attribution.sum(1), {"attribution": res.attribution}, meta)
