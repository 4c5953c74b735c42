"""Grad-CAM (Selvaraju et al. 2017) for any network and any convolutional layer.

Channel weights are the spatial mean of the target score's gradient at the layer; the map is the
ReLU of the weighted channel sum, upsampled to the input size (bilinear, ``align_corners=False``).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.methods.hooks import Target, capture, check_target, require_conv_output, upsample


def layer_activation_and_gradient(model: nn.Module, x: torch.Tensor, target: Target,
                                  layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output A (B,C,h,w) and d logit[target] / dA, from one forward/backward pass."""
    x = x.detach().requires_grad_(True)  # builds the graph even when parameters are frozen
    with capture(model, layer) as cap:
        logits = model(x)
    act = cap.output
    require_conv_output(act, layer, model, "Grad-CAM")
    t = check_target(target, logits.shape[1], x.shape[0]).to(logits.device)
    (grad,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), act, allow_unused=True)
    if grad is None:
        raise PipelineError(f"Layer '{layer}' does not feed the model's output; pick a layer on "
                            "the path from the input to the logits.")
    return act.detach(), grad


def gradcam(model: nn.Module, x: torch.Tensor, target: Target, layer: str) -> torch.Tensor:
    """Grad-CAM map (B,H,W) at the input resolution for a batch ``x`` and its targets."""
    act, grad = layer_activation_and_gradient(model, x, target, layer)
    weights = grad.mean(dim=(2, 3))
    cam = torch.relu(torch.einsum("bc,bchw->bhw", weights, act))
    return upsample(cam, tuple(x.shape[-2:]))
