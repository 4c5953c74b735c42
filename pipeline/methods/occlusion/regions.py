"""Krypton's box arithmetic and patch values: the changed box of a batch of occlusion positions on
one tensor (``Region``), how a layer's window grows it, and gathering/scattering the patch values
between cached full tensors and stacked windows (see :mod:`pipeline.methods.occlusion.krypton`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch



# ----------------------------------------------------------------------------------------------
# Boxes


@dataclass
class Region:
    """Changed boxes of a batch of positions on one (H, W) tensor.

    ``y0, y1, x0, x1`` (b,) are each position's exact changed box (half-open); ``cy, cx`` (b,) and
    ``h, w`` give the recomputed box: one common size that contains every changed box.
    """

    y0: torch.Tensor
    y1: torch.Tensor
    x0: torch.Tensor
    x1: torch.Tensor
    height: int
    width: int
    cy: torch.Tensor = field(init=False)
    cx: torch.Tensor = field(init=False)
    h: int = field(init=False)
    w: int = field(init=False)

    def __post_init__(self) -> None:
        self.h, self.cy = common_extent(self.y0, self.y1, self.height)
        self.w, self.cx = common_extent(self.x0, self.x1, self.width)

    def area(self) -> torch.Tensor:
        """Exact changed area of each position (b,)."""
        return (self.y1 - self.y0) * (self.x1 - self.x0)

    def same_box(self, other: Region) -> bool:
        """True when both recompute the same box for every position."""
        return (self.h == other.h and self.w == other.w and torch.equal(self.cy, other.cy)
                and torch.equal(self.cx, other.cx))


def common_extent(lo: torch.Tensor, hi: torch.Tensor, size: int) -> tuple[int, torch.Tensor]:
    """Common box length (at least 1) and per-position starts, shifted inside [0, size)."""
    length = min(size, max(1, int((hi - lo).max())))
    return length, torch.minimum(lo, torch.full_like(lo, size - length)).clamp(min=0)


def div_ceil(a: torch.Tensor, b: int) -> torch.Tensor:
    return -torch.div(-a, b, rounding_mode="floor")


# Krypton's threshold leaves maps smaller than this alone: on the last, smallest maps a patch's
# change reaches the whole map (measured: above 10% of its peak on 90-100% of the rows of
# ResNet-18's and EfficientNet-Lite0's 7x7 maps), so cutting there loses most of the accuracy
# (tau=0.5 on every map: heat-map SSIM 0.93-0.94; maps of 8 or more only: 0.99).
TAU_MIN_SIZE = 8


def cap_box(lo: torch.Tensor, hi: torch.Tensor, size: int, tau: float | None,
         centre: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Krypton's projective-field threshold: on maps of at least ``TAU_MIN_SIZE``, boxes longer
    than ceil(tau * size) are cut to that length, centred on ``centre`` (b,), the patch's centre as
    a fraction of the image, where the change is largest (on the box's own centre without it),
    and kept inside the box. Centring on the patch rather than on a box clipped at the image's
    edge matters: tau=0.6 on ResNet-18 gave heat-map SSIM 0.886 box-centred, 0.979 patch-centred."""
    if tau is None or size < TAU_MIN_SIZE:
        return lo, hi
    limit = max(1, math.ceil(tau * size))
    if centre is None:
        start = lo + (hi - lo - limit).clamp(min=0) // 2
    else:
        start = torch.round(centre * size - limit / 2).long()
        start = torch.minimum(torch.maximum(start, lo), (hi - limit).clamp(min=0))
        start = torch.where(hi - lo > limit, start, lo)
    return start, torch.minimum(hi, start + limit)


def window_axis(lo: torch.Tensor, hi: torch.Tensor, pad: int, kernel: int, stride: int,
                 dilation: int, out_size: int, tau: float | None,
                 centre: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Output range of a sliding-window op that reads input rows [lo, hi) (unpadded), capped
    by ``tau`` (see ``cap_box``)."""
    reach = dilation * (kernel - 1)
    out_lo = div_ceil(lo + pad - reach, stride).clamp(0, out_size)
    out_hi = (torch.div(hi - 1 + pad, stride, rounding_mode="floor") + 1).clamp(0, out_size)
    out_hi = torch.where(hi > lo, torch.maximum(out_hi, out_lo), out_lo)
    return cap_box(out_lo, out_hi, out_size, tau, centre)


# ----------------------------------------------------------------------------------------------
# Values


@dataclass
class Patch:
    """The values (b, C, h, w) of a batch over its recomputed boxes; outside them, the cache."""

    values: torch.Tensor
    region: Region


@dataclass
class Dense:
    """A value computed in full for every position of the batch (after a global layer)."""

    value: Any


def flat(t: torch.Tensor) -> torch.Tensor:
    """(1, C, H, W) -> (H * W, C) rows of channels, the layout the window gathers read."""
    return t[0].permute(1, 2, 0).reshape(-1, t.shape[1]).contiguous()


def gather(base: torch.Tensor, base_width: int, ry: torch.Tensor, rx: torch.Tensor,
            rh: int, rw: int, patch: Patch | None = None, offset: tuple[int, int] = (0, 0)
            ) -> torch.Tensor:
    """Windows (b, C, rh, rw) at (ry, rx) of a cached map (flattened by ``flat``), with a patch's
    values overlaid where its box falls inside; ``offset`` is the patch box's shift into the
    cached map's coordinates (the padding). Returned in channels-last memory."""
    if patch is not None and patch.region.h == rh and patch.region.w == rw \
            and torch.equal(patch.region.cy + offset[0], ry) \
            and torch.equal(patch.region.cx + offset[1], rx):
        return patch.values  # the window is exactly the patch box (1x1 convs)
    rows = ry[:, None] + torch.arange(rh)
    cols = rx[:, None] + torch.arange(rw)
    index = rows[:, :, None] * base_width + cols[:, None, :]
    out = torch.index_select(base, 0, index.reshape(-1))  # far faster than base[index]
    if patch is not None:
        overlay(out, ry, rx, rh, rw, patch, offset)
    return out.view(len(ry), rh, rw, base.shape[1]).permute(0, 3, 1, 2)


def scatter(ry: torch.Tensor, rx: torch.Tensor, rh: int, rw: int, patch: Patch,
             offset: tuple[int, int]) -> torch.Tensor:
    """Like ``gather`` from an all-zero map: windows holding only the patch's values."""
    if patch.region.h == rh and patch.region.w == rw \
            and torch.equal(patch.region.cy + offset[0], ry) \
            and torch.equal(patch.region.cx + offset[1], rx):
        return patch.values
    channels = patch.values.shape[1]
    out = torch.zeros(len(ry) * rh * rw, channels, dtype=patch.values.dtype)
    overlay(out, ry, rx, rh, rw, patch, offset)
    return out.view(len(ry), rh, rw, channels).permute(0, 3, 1, 2)


def overlay(out: torch.Tensor, ry: torch.Tensor, rx: torch.Tensor, rh: int, rw: int,
             patch: Patch, offset: tuple[int, int]) -> None:
    """Write a patch's values into windows (b * rh * rw, C) at (ry, rx), where they overlap."""
    b, channels = len(ry), out.shape[1]
    reg = patch.region
    dy = reg.cy + offset[0] - ry
    dx = reg.cx + offset[1] - rx
    pvals = patch.values.permute(0, 2, 3, 1).reshape(-1, channels)
    batch = torch.arange(b)[:, None, None]
    if bool((dy >= 0).all() and (dy <= rh - reg.h).all() and (dx >= 0).all()
            and (dx <= rw - reg.w).all()):
        # every patch box lies inside its window: one copy of all patch rows
        dest = ((batch * rh + dy[:, None, None] + torch.arange(reg.h)[None, :, None]) * rw
                + dx[:, None, None] + torch.arange(reg.w)[None, None, :])
        out.index_copy_(0, dest.reshape(-1), pvals)
    else:
        pr = torch.arange(rh)[None, :, None] - dy[:, None, None]
        pc = torch.arange(rw)[None, None, :] - dx[:, None, None]
        inside = ((pr >= 0) & (pr < reg.h) & (pc >= 0) & (pc < reg.w)).reshape(-1)
        source = ((batch * reg.h + pr) * reg.w + pc).reshape(-1)
        out.index_copy_(0, inside.nonzero().squeeze(1),
                        torch.index_select(pvals, 0, source[inside]))
