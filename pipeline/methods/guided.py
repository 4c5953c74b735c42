"""Guided backpropagation (Springenberg et al. 2015) and Guided Grad-CAM (Selvaraju et al. 2017).

Guided backprop is the target score's gradient with respect to the input where every ``nn.ReLU`` /
``nn.ReLU6`` module's backward passes only the positive gradients, and only where the module's
input was in its linear range: the ReLU's own gradient with its negative values zeroed (Captum's
``GuidedBackprop``, which overrides ``nn.ReLU`` modules only; here ReLU6 too). Functional
``F.relu`` calls cannot be reached, so a model without ReLU modules is not applicable.

For a unit instead of a class, :func:`guided_projection` is the deconvnet's projection of the unit
with guided backprop's rule (Springenberg et al. Fig. 1): the forward's ReLU masks enter the backward
pass, so the picture depends on the image even where the network has no max-pool switches.

Guided Grad-CAM multiplies the guided gradient by the Grad-CAM map upsampled to the input (Captum's
``GuidedGradCam`` with ``interpolate_mode="bilinear"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pipeline.methods.base import Explanation, LocalizerSource, MapMethod, NotApplicable, PassNeeds
from pipeline.methods.deconvnet import DeconvResult, relu_backward_override, relu_modules, unit_projection
from pipeline.methods.gradcam import GradCAM
from pipeline.methods.hooks import Target, watching
from pipeline.methods.saliency import input_gradient


def guided_rule(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    """Guided backprop's ReLU (or ReLU6): the module's own output, whose incoming gradient loses its
    negative part before the ReLU's own backward passes it where the ReLU was linear (0 < input,
    and < 6 for ReLU6). The ReLU runs once, as in the plain forward."""
    if output.requires_grad:
        output.register_hook(torch.relu)
    return output


def guided_gradient(model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    """The guided-backprop gradient (B,C,H,W) of the target scores; the model is left as it was."""
    with relu_backward_override(model, guided_rule):
        return input_gradient(model, x, target)


def guided_projection(model: nn.Module, x: torch.Tensor, layer: str | Sequence[str],
                      channel: int | Sequence[int], *, scale_by_activation: bool = True) -> DeconvResult:
    """Guided backprop of each image's strongest unit of ``channel`` in ``layer`` to the input
    (same batching and result as :func:`pipeline.methods.deconvnet.deconvnet`)."""
    return unit_projection(model, x, layer, channel, guided_rule, scale_by_activation=scale_by_activation)


def require_relu_modules(model: nn.Module, x0: torch.Tensor, method: str) -> None:
    """A NotApplicable unless the forward pass on ``x0`` calls an ``nn.ReLU`` / ``nn.ReLU6`` module."""
    relus = set(relu_modules(model))
    called = False
    if relus:
        with watching(model, lambda _n, m: m in relus) as calls, torch.no_grad():
            model(x0)
        called = bool(calls)
    if not called:
        raise NotApplicable(
            f"{method} needs nn.ReLU / nn.ReLU6 modules to guide, but {type(model).__name__}'s forward "
            f"calls none (its ReLUs are functional F.relu calls, or it has none), so {method} would be "
            "the plain gradient: use saliency instead, or build the model with nn.ReLU modules.")


class GuidedBackprop(MapMethod):
    """Guided backprop: max over colour channels of |guided gradient|; the signed gradient is an extra."""

    name = "guided_backprop"
    fast_model = True
    needs_hooks = True
    description = "gradient through ReLUs that pass only positive gradients (Springenberg et al. 2015)"

    def prepare(self, model: nn.Module, x0: torch.Tensor, env: LocalizerSource | None = None) -> MapMethod:
        super().prepare(model, x0, env)
        require_relu_modules(model, x0, self.name)
        return self

    def attribute(self, model: nn.Module, x: torch.Tensor, target: Target) -> Explanation:
        attr = guided_gradient(model, x, target)
        return Explanation(attr.abs().amax(1), {"attribution": attr})


class GuidedGradCAM(GradCAM):
    """Guided backprop times the Grad-CAM map (ReLU'd, bilinearly upsampled) of ``layer``; the map is
    max over colour channels of |attribution| (Grad-CAM's non-negative factor times guided backprop's
    map), the signed (B,C,H,W) product is an extra."""

    name = "guided_gradcam"
    description = "guided backprop times the Grad-CAM map (Selvaraju et al. 2017)"

    def prepare(self, model: nn.Module, x0: torch.Tensor, env: LocalizerSource | None = None) -> MapMethod:
        super().prepare(model, x0, env)
        require_relu_modules(model, x0, self.name)
        return self

    def attribute(self, model: nn.Module, x: torch.Tensor, target: Target) -> Explanation:
        cam = super().attribute(model, x, target).maps
        attr = guided_gradient(model, x, target) * cam[:, None]
        return Explanation(attr.abs().amax(1), {"attribution": attr})

    def shared_needs(self) -> PassNeeds | None:
        return None  # the guided gradient needs its own backward pass
