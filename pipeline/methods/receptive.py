"""Receptive fields: how big an input region one unit of a layer sees, and the crop around a unit."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.methods.hooks import forward_until


def receptive_field(model: nn.Module, layer: str, input_shape: tuple[int, int, int], trials: int = 4,
                    seed: int = 0) -> tuple[int, int]:
    """Empirical receptive field (height, width) of the centre unit of ``layer``.

    The gradient of that unit w.r.t. random inputs is non-zero exactly on the pixels it can see
    (where ReLUs happen to pass); the union over a few inputs gives the field's extent.
    """
    gen = torch.Generator().manual_seed(seed)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    seen = torch.zeros(input_shape[1:], dtype=torch.bool)
    for _ in range(trials):
        x = torch.randn(1, *input_shape, generator=gen).to(device).requires_grad_(True)
        out = forward_until(model, layer, x)
        if out.dim() != 4:
            return input_shape[1], input_shape[2]
        h, w = out.shape[2:]
        (g,) = torch.autograd.grad(out[0, :, h // 2, w // 2].sum(), x)
        seen |= (g[0].abs().sum(0) > 0).cpu()
    ys, xs = torch.nonzero(seen, as_tuple=True)
    if len(ys) == 0:
        return input_shape[1], input_shape[2]
    return int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)


def unit_box(flat_index: int, hw: tuple[int, int], input_hw: tuple[int, int],
             field: tuple[int, int]) -> tuple[int, int, int, int]:
    """Input-pixel box (x0, y0, x1, y1) of the receptive field around unit ``flat_index`` (y*W+x).

    The unit's centre maps proportionally to the input; the box is clipped to the image.
    """
    h, w = hw
    in_h, in_w = input_hw
    y, x = divmod(int(flat_index), w)
    cy, cx = (y + 0.5) * in_h / h, (x + 0.5) * in_w / w
    fh, fw = min(field[0], in_h), min(field[1], in_w)
    y0 = int(round(min(max(cy - fh / 2, 0), in_h - fh)))
    x0 = int(round(min(max(cx - fw / 2, 0), in_w - fw)))
    return x0, y0, x0 + fw, y0 + fh
