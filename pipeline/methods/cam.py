"""Class activation maps (Zhou et al. 2016) and the localizer conversion for networks without a
global-average-pooling head.

For a network ending in ``conv maps A -> global average pooling -> Linear``, the class score is
``sum_c w[k, c] * mean(A_c) + b_k``, so ``CAM_k = sum_c w[k, c] * A_c`` shows where the score comes
from. A network with a flatten + fully-connected head is converted first: keep its trunk up to a
conv layer, add GAP and a new Linear trained on the pooled features (``GapLocalizer``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from pipeline.errors import PipelineError
from pipeline.methods.base import Explanation, LocalizerSource, MapMethod, NotApplicable, PassNeeds, SharedPass
from pipeline.methods.heads import CONVERSION_HINT, GapHead, find_gap_head, last_feature_map
from pipeline.methods.hooks import (Target, check_target, forward_until, get_layer,
                                    require_conv_output, upsample)


def cam(model: nn.Module, x: torch.Tensor, target: Target,
        head: GapHead | None = None) -> torch.Tensor:
    """Class activation maps (B,H,W) at the input resolution, signed and unnormalised.

    ``head`` defaults to :func:`find_gap_head` on the first image; an explicit head is trusted to
    be a GAP + linear head (only its shapes are checked). On such a network, at the layer's
    resolution, ReLU(CAM) equals Grad-CAM at the same layer times the layer's h*w positions
    (here CAM is upsampled before any ReLU, Grad-CAM after its ReLU).
    """
    head = head or find_gap_head(model, x[:1])
    fc = get_layer(model, head.fc)
    if not isinstance(fc, nn.Linear):
        raise PipelineError(f"CAM needs a Linear layer for the class weights, but '{head.fc}' is "
                            f"a {type(fc).__name__}.")
    with torch.no_grad():
        act = forward_until(model, head.layer, x)
    require_conv_output(act, head.layer, model, "CAM")
    if act.shape[1] != fc.in_features:
        raise PipelineError(
            f"Layer '{head.layer}' has {act.shape[1]} channels but '{head.fc}' takes "
            f"{fc.in_features} features, so they do not form a GAP + linear head. "
            f"{CONVERSION_HINT}")
    t = check_target(target, fc.out_features, x.shape[0]).to(fc.weight.device)
    return class_maps(act, fc, t, tuple(x.shape[-2:]))


def class_maps(act: torch.Tensor, fc: nn.Linear, t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``sum_c w[t, c] * A_c`` for each image's target ``t``, upsampled to ``size``."""
    return upsample(torch.einsum("bc,bchw->bhw", fc.weight.detach()[t].to(act.dtype), act), size)


PLANES_EIGHT_CONNECTED = np.zeros((3, 3, 3), dtype=bool)
PLANES_EIGHT_CONNECTED[1] = True  # 8-connected within a map, never across maps of a batch


def cam_box(maps: torch.Tensor, fraction: float = 0.2) -> torch.Tensor:
    """Bounding box of the largest 8-connected region where a map is >= ``fraction`` of its max.

    ``maps`` is (H,W) or (B,H,W); returns int64 (4,) or (B,4) boxes ``(x0, y0, x1, y1)`` in pixels,
    with x1 and y1 exclusive. A map with no positive value gives the whole image. The 0.2 default
    is the CAM paper's threshold. The whole batch is labelled in one call (regions never cross
    maps, and their labels rise map by map in scan order, as one map's own labelling numbers them),
    so of equal regions the first in scan order is taken, as per map.
    """
    if not 0 <= fraction <= 1:
        raise PipelineError(f"The CAM box threshold is a fraction of the max in [0, 1], got "
                            f"{fraction}.")
    single = maps.dim() == 2
    arr = maps.detach().float().cpu().numpy()
    arr = arr[None] if single else arr
    b, h, w = arr.shape
    boxes = np.tile(np.array([0, 0, w, h], dtype=np.int64), (b, 1))
    top = arr.reshape(b, -1).max(1) if arr.size else np.zeros(b, arr.dtype)
    lit = np.flatnonzero(top > 0)
    if len(lit):
        sub = arr[lit]
        labels, _ = ndimage.label(sub >= (fraction * top[lit])[:, None, None], structure=PLANES_EIGHT_CONNECTED)
        counts = np.bincount(labels.ravel())
        last = labels.reshape(len(lit), -1).max(1)  # every lit map has a region: its max
        first = np.concatenate(([1], last[:-1] + 1))
        biggest = np.array([f + counts[f:e + 1].argmax() for f, e in zip(first, last)])
        region = labels == biggest[:, None, None]
        rows, cols = region.any(2), region.any(1)
        boxes[lit] = np.stack([cols.argmax(1), rows.argmax(1), w - cols[:, ::-1].argmax(1),
                               h - rows[:, ::-1].argmax(1)], 1)
    out = torch.from_numpy(boxes)
    return out[0] if single else out


class Trunk(nn.Module):
    """A model run only as far as one layer (see :func:`forward_until`); shares its parameters."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        super().__init__()
        get_layer(model, layer)
        self.model = model
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward_until(self.model, self.layer, x)


class GapLocalizer(nn.Module):
    """A classifier converted for CAM: its trunk up to ``layer`` + GAP + the Linear ``fc``.

    The trunk's output is exposed as the layer ``trunk`` (``head`` names it for :func:`cam`).
    The wrapped model's parameters are shared, not copied.
    """

    def __init__(self, model: nn.Module, layer: str, fc: nn.Linear) -> None:
        super().__init__()
        self.trunk = Trunk(model, layer)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = fc

    @property
    def head(self) -> GapHead:
        """The GAP + linear head for :func:`cam`."""
        return GapHead("trunk", "fc")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.trunk(x)
        require_conv_output(feats, self.trunk.layer, self.trunk.model, "The CAM localizer")
        return self.fc(self.flatten(self.pool(feats)))


def pooled_features(model: nn.Module, layer: str, images: torch.Tensor,
                    batch_size: int = 64) -> torch.Tensor:
    """Spatial means (N,C) of ``layer``'s output over ``images`` (N,C,H,W), in batches.

    Batches run on the model's device; the result is on ``images``' device.
    """
    if batch_size < 1:
        raise PipelineError(f"batch_size must be >= 1, got {batch_size}.")
    param = next(model.parameters(), None)
    device = param.device if param is not None else images.device
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            act = forward_until(model, layer, images[start:start + batch_size].to(device))
            require_conv_output(act, layer, model, "Pooled features")
            out.append(act.mean(dim=(2, 3)).to(images.device))
    return torch.cat(out)


def fit_gap_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 epochs: int = 100, lr: float = 1.0, seed: int = 0,
                 weight_decay: float = 1e-4) -> nn.Linear:
    """Train a softmax-regression Linear(C, num_classes) on pooled features (N,C), full batch.

    L-BFGS (``epochs`` iterations, strong-Wolfe line search) on standardised features with a small
    L2 penalty, then the standardisation is folded back into the weights so the layer takes raw
    pooled features. Weights start from a generator seeded with ``seed``; deterministic on CPU.
    Returns a float32 Linear on the CPU.
    """
    if features.dim() != 2 or labels.dim() != 1 or features.shape[0] != labels.shape[0]:
        raise PipelineError(f"fit_gap_head needs features (N,C) and labels (N,), got "
                            f"{tuple(features.shape)} and {tuple(labels.shape)}.")
    if num_classes < 2 or features.shape[0] == 0:
        raise PipelineError("fit_gap_head needs at least 2 classes and 1 example.")
    y = check_target(labels, num_classes).cpu()
    feats = features.detach().float().cpu()
    mean, std = feats.mean(0), feats.std(0, unbiased=False)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    z = (feats - mean) / std
    gen = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(num_classes, feats.shape[1], generator=gen)).requires_grad_(True)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=lr, max_iter=epochs, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z @ weight.T + bias, y)
        loss = loss + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    linear = nn.Linear(feats.shape[1], num_classes)
    with torch.no_grad():
        w = weight / std
        linear.weight.copy_(w)
        linear.bias.copy_(bias - w @ mean)
    return linear


class CAM(MapMethod):
    """Class activation maps at the model's own GAP + linear head; on a model without one (or at
    another layer) on a GAP localizer fitted by the stage (``convert=auto``)."""

    name = "cam"
    fast_model = True
    DEFAULTS = {"layer": None, "convert": "auto",
                "fit": {"epochs": 100, "lr": 1.0, "weight_decay": 1e-4, "seed": 0}}  # the localizer's Linear
    needs_hooks = True
    description = "class activation map of a GAP + linear head (Zhou et al. 2016)"

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self.localizer: nn.Module | None = None
        self.conversion: dict[str, Any] | None = None
        self.head: GapHead | None = None

    def validate(self) -> None:
        self._choice("convert", ("auto", "never"))
        self.settings["fit"] = {**self.DEFAULTS["fit"], **dict(self.settings["fit"] or {})}

    def prepare(self, model: nn.Module, x0: torch.Tensor, env: LocalizerSource | None = None) -> MapMethod:
        super().prepare(model, x0, env)
        try:
            head: GapHead | None = find_gap_head(model, x0)
            no_head = ""
        except PipelineError as err:
            head, no_head = None, str(err)
        layer = self.settings["layer"]
        if layer is not None:
            layer = str(layer)
            with torch.no_grad():
                require_conv_output(forward_until(model, layer, x0), layer, model, "CAM")
        if head is not None and layer in (None, head.layer):
            self.head = head
        elif self.settings["convert"] == "never":
            if head is None:
                raise NotApplicable(f"{no_head} With explain.cam.convert=auto the explain stage does this "
                                    "conversion itself (it fits only the new linear layer).")
            raise NotApplicable(f"explain.cam.layer={layer} is not the layer the model's GAP head reads "
                                f"('{head.layer}'), so plain CAM does not apply there. Use explain.cam.layer=null, "
                                f"or explain.cam.convert=auto to fit a GAP localizer at '{layer}'.")
        else:
            layer = layer or last_feature_map(model, x0)
            if env is None:
                raise NotApplicable(f"cam: {type(model).__name__} needs a GAP localizer fitted at '{layer}' "
                                    "(it has no GAP + linear head there); run it through the explain stage, "
                                    "which fits one, or use gradcam.")
            self.localizer, self.conversion = env.gap_localizer(model, layer, self.settings["fit"])
            self.head = self.localizer.head
        self.settings["layer"] = head.layer if self.localizer is None else layer
        return self

    def key_settings(self) -> dict[str, Any]:
        if self.head is None:
            raise PipelineError("cam: call prepare(model, x0) before using the method.")
        return {"layer": self.settings["layer"], "fc": self.head.fc,
                "localizer": self.conversion["key"] if self.conversion else None}

    def conversion_facts(self) -> dict[str, Any] | None:
        return self.conversion

    def sanity_note(self) -> str:
        return ("the model has no GAP + linear head here: CAM runs on a fitted localizer, whose trunk is the "
                "trained model" if self.localizer is not None else "")

    def shared_needs(self) -> PassNeeds | None:
        """The model's own head only: a fitted localizer is another network."""
        if self.head is None or self.localizer is not None:
            return None
        return PassNeeds(frozenset({self.head.layer}))

    def from_pass(self, model: nn.Module, p: SharedPass) -> Explanation:
        assert self.head is not None
        act = p.acts[self.head.layer]
        fc = get_layer(model, self.head.fc)
        require_conv_output(act, self.head.layer, model, "CAM")
        if not isinstance(fc, nn.Linear) or act.shape[1] != fc.in_features:
            raise PipelineError(f"Layer '{self.head.layer}' and '{self.head.fc}' do not form a GAP + linear head. "
                                f"{CONVERSION_HINT}")
        maps = class_maps(act, fc, p.targets.to(fc.weight.device), tuple(p.x.shape[-2:]))
        info = {"layer": self.settings["layer"], "converted": False}
        return Explanation(maps, meta=[dict(info) for _ in range(p.x.shape[0])])

    def attribute(self, model: nn.Module, x: torch.Tensor, target: Target) -> Explanation:
        if self.head is None:
            self.prepare(model, x[:1])
        net = self.localizer if self.localizer is not None else model
        maps = cam(net, x, target, head=self.head)
        info = {"layer": self.settings["layer"], "converted": self.localizer is not None}
        return Explanation(maps, meta=[dict(info) for _ in range(x.shape[0])])
