"""Grad-CAM (Selvaraju et al. 2017) and the CAM variants that reweight one conv layer's channels.

Each is a :class:`~pipeline.methods.base.LayerMethod`: one forward/backward pass captures the
layer's output A (B,C,h,w) and the target score's gradient G there; the map is
``relu(sum_c w_c A_c)`` (or an elementwise variant) upsampled bilinearly to the input
(``align_corners=False``). The formulas follow the papers as pytorch-grad-cam implements them, so
its classes are the parity reference (its maps are ours min-max scaled).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.methods.base import LayerMethod
from pipeline.methods.hooks import Target


class GradCAM(LayerMethod):
    """Channel weights: the spatial mean of the gradient."""

    name = "gradcam"
    title = "Grad-CAM"
    description = "channels weighted by their mean gradient (Selvaraju et al. 2017)"

    def weights(self, act: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        return grad.mean(dim=(2, 3))


class GradCAMPlusPlus(LayerMethod):
    """Weights: positive gradients weighted by alpha = G^2 / (2 G^2 + sum(A) G^3) (Chattopadhay et
    al. 2018, eq. 19, with the exponential's higher derivatives as powers of G)."""

    name = "gradcam_plusplus"
    title = "Grad-CAM++"
    description = "positive gradients with pixel-wise weights (Chattopadhay et al. 2018)"

    def weights(self, act: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        g2 = grad.square()
        alpha = g2 / (2 * g2 + act.sum(dim=(2, 3), keepdim=True) * g2 * grad + 1e-6)
        alpha = torch.where(grad != 0, alpha, torch.zeros_like(alpha))
        return (grad.clamp(min=0) * alpha).sum(dim=(2, 3))


class XGradCAM(LayerMethod):
    """Weights: the gradient averaged with the activations' own spatial weights (Fu et al. 2020)."""

    name = "xgradcam"
    title = "XGrad-CAM"
    description = "gradients weighted by normalised activations (Fu et al. 2020)"

    def weights(self, act: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        return (grad * act / (act.sum(dim=(2, 3), keepdim=True) + 1e-7)).sum(dim=(2, 3))


class LayerCAM(LayerMethod):
    """Elementwise: each position's activation times its positive gradient (Jiang et al. 2021)."""

    name = "layercam"
    title = "LayerCAM"
    description = "activations times their positive gradients, per position (Jiang et al. 2021)"

    def cam(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, act: torch.Tensor,
            grad: torch.Tensor | None) -> torch.Tensor:
        return (grad.clamp(min=0) * act).sum(1)


class HiResCAM(LayerMethod):
    """Elementwise: activation times gradient, summed over channels (Draelos & Carin 2020): the
    map whose sum is the gradient's first-order account of the score at this layer."""

    name = "hirescam"
    title = "HiRes-CAM"
    description = "activations times gradients, per position (Draelos & Carin 2020)"

    def cam(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, act: torch.Tensor,
            grad: torch.Tensor | None) -> torch.Tensor:
        return (grad * act).sum(1)


class EigenCAM(LayerMethod):
    """The activations' first principal component at each position (Muhammad & Yeasin 2020):
    class-agnostic, no gradient. A principal component's sign is arbitrary (LAPACK builds may pick
    either, and pytorch-grad-cam takes whatever numpy returns); here it is fixed so that the map
    rises where the mean activation does, so the same model gives the same map on any machine."""

    name = "eigencam"
    title = "Eigen-CAM"
    version = 2  # 2: the component's sign follows the mean activation
    uses_gradients = False
    description = "first principal component of the activations (class-agnostic; Muhammad & Yeasin 2020)"

    def cam(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, act: torch.Tensor,
            grad: torch.Tensor | None) -> torch.Tensor:
        return first_component(act)


def first_component(act: torch.Tensor) -> torch.Tensor:
    """Per image, the centred (h*w, C) activations projected on their first right singular vector,
    signed to correlate positively with the mean activation over channels."""
    b, c, h, w = act.shape
    flat = torch.nan_to_num(act.detach().float()).flatten(2).transpose(1, 2)  # (B, hw, C)
    flat = flat - flat.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    proj = (flat @ vh[:, 0, :, None])[..., 0]  # (B, hw)
    sign = torch.where((proj * flat.mean(dim=2)).sum(1, keepdim=True) < 0, -1.0, 1.0)
    return (sign * proj).reshape(b, h, w).to(act.dtype)


def gradcam(model: nn.Module, x: torch.Tensor, target: Target, layer: str) -> torch.Tensor:
    """Grad-CAM maps (B,H,W) at the input resolution for a batch ``x`` and its targets."""
    return GradCAM(layer=layer).attribute(model, x, target).maps
