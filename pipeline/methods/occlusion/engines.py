"""Occlusion engines: callables ``(boxes (b, 4), fill (1, C, H, W)) -> logits (b, K)`` that return
the logits of the image occluded at those boxes. :class:`PlainEngine` runs the model on the occluded
batch: the reference every faster engine (``pipeline.methods.occlusion.krypton``) must match."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.methods.occlusion.patches import occlude

Engine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class PlainEngine:
    """Runs the model on the occluded batch: the reference every faster engine must match."""

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        self.model = model
        self.x = x

    @torch.no_grad()
    def __call__(self, boxes: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        return self.model(occlude(self.x, fill, boxes))
