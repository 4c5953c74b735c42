"""Per-channel activation statistics of chosen layers, recorded during an ordinary forward pass."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from pipeline.methods.hooks import recording


def channel_stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Spatial max, spatial mean and flat argmax (y*W+x) per channel of a (B,C,H,W) or (B,C) tensor.

    Returns (max (B,C) float32, mean (B,C) float32, argmax (B,C) int32, (H, W)).
    """
    t = t.detach()
    if t.dim() == 2:
        t = t[:, :, None, None]
    if t.dim() != 4:
        raise ValueError(f"expected a (B,C,H,W) or (B,C) activation, got shape {tuple(t.shape)}")
    b, c, h, w = t.shape
    flat = t.reshape(b, c, h * w).float()
    if flat.device.type == "cpu":
        # numpy's SIMD argmax is ~10x faster than torch's max(dim) with indices on the CPU, and
        # this runs on every extracted batch; both return the first maximum.
        arg = torch.from_numpy(np.argmax(flat.numpy(), axis=2))
    else:
        arg = flat.argmax(dim=2)
    mx = flat.gather(2, arg[..., None])[..., 0]
    return mx, flat.mean(dim=2), arg.to(torch.int32), (h, w)


@contextmanager
def record_stats(model: nn.Module, layers: Sequence[str]) -> Iterator[dict[str, tuple]]:
    """While active, each forward pass stores ``channel_stats`` of every named layer's output.

    The dict maps layer -> (max, mean, argmax, hw) of the latest forward; the outputs themselves
    are not kept. A module that runs twice in one forward is read at its first call
    (``hooks.REUSED_MODULE_RULE``), as everywhere else; hooks are always removed.
    """
    out: dict[str, tuple] = {}

    def reduce(name: str, output: torch.Tensor) -> None:
        out[name] = channel_stats(output)

    with recording(model, layers, retain=False, on_output=reduce):
        yield out
