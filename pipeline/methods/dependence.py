"""Does a picture depend on the image? Input-dependence and stride-grid scores (pure tensor maths).

The model-randomisation check (Adebayo et al. 2018) asks whether a map depends on what the model
learned; this asks the input side (Kindermans et al. 2017, "The (un)reliability of saliency
methods"): the maps of *different* images for the same unit, or the same target class, should
differ. The score is the mean Spearman rank correlation over every pair of images; near 1, the
picture is a property of the network or the method (a Zeiler-Fergus deconvnet on a network without
max-pool switches: the image enters its backward pass nowhere, Mahendran & Vedaldi 2016).

Unit projections sit at each image's strongest unit, which moves from image to image, so they are
compared :func:`aligned` on the unit, within its receptive field: outside it a projection is zero,
and those tied zeros would make any two projections look alike.

The stride grid: a strided layer's transposed convolution spreads a unit's signal on a lattice
with the layer's stride as its period, a checkerboard. :func:`stride_grid_share` is the share of a
picture's power at the frequencies of a pattern that repeats every ``stride`` pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from pipeline.methods.sanity import rank_average


def pairwise_spearman(maps: Tensor) -> Tensor:
    """(N, ...) maps -> (N, N) Spearman rank correlation of every pair; NaN in the rows and columns
    of a constant map (it has no ranking)."""
    r = rank_average(maps.flatten(1))
    r = r - r.mean(1, keepdim=True)
    norm = r.norm(dim=1)
    return (r @ r.T) / (norm[:, None] * norm[None, :])


def mean_off_diagonal(corr: Tensor) -> float:
    """Mean of the finite entries above the diagonal of a square matrix; NaN when there are none."""
    n = corr.shape[0]
    upper = corr[torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)]
    upper = upper[torch.isfinite(upper)]
    return float(upper.double().mean()) if upper.numel() else math.nan


def input_dependence(maps: Tensor) -> float:
    """Mean Spearman between the maps (N, ...) of different images, constant maps left out; NaN
    with fewer than two usable maps. Near 1: the maps barely depend on the image."""
    if maps.shape[0] < 2:
        return math.nan
    return mean_off_diagonal(pairwise_spearman(maps.detach().float().cpu()))


def aligned(a: Tensor, centre_a: Sequence[int], b: Tensor, centre_b: Sequence[int],
            field: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The values of pictures ``a`` and ``b`` (C, H, W) in one window of ``field`` = (h, w) pixels
    centred on each one's unit (``centre_*`` = (y, x) pixels), cut to where both windows lie inside
    their pictures: the same offsets from each unit. Empty tensors when there is no overlap."""
    offsets = []
    for axis, size in enumerate(field):
        extent_a, extent_b = a.shape[1 + axis], b.shape[1 + axis]
        lo = max(-(int(size) // 2), -int(centre_a[axis]), -int(centre_b[axis]))
        hi = min(int(size) - int(size) // 2, extent_a - int(centre_a[axis]), extent_b - int(centre_b[axis]))
        offsets.append((lo, max(lo, hi)))
    (y0, y1), (x0, x1) = offsets
    ya, xa, yb, xb = (int(v) for v in (*centre_a, *centre_b))
    return (a[:, ya + y0:ya + y1, xa + x0:xa + x1].flatten(),
            b[:, yb + y0:yb + y1, xb + x0:xb + x1].flatten())


def aligned_dependence(pictures: Sequence[Tensor], centres: Sequence[Sequence[int]], field: Sequence[int],
                       min_pixels: int = 16) -> float:
    """Mean Spearman over every pair of unit projections (C, H, W), compared :func:`aligned` on
    their units; pairs that share fewer than ``min_pixels`` pixels, or where a window is constant,
    are left out. NaN with no usable pair."""
    rhos = []
    for i in range(len(pictures)):
        for j in range(i + 1, len(pictures)):
            va, vb = aligned(pictures[i].float().cpu(), centres[i], pictures[j].float().cpu(), centres[j], field)
            if va.numel() < min_pixels * pictures[i].shape[0]:
                continue
            rho = float(pairwise_spearman(torch.stack([va, vb]))[0, 1])
            if math.isfinite(rho):
                rhos.append(rho)
    return sum(rhos) / len(rhos) if rhos else math.nan


def unit_centre(position: Sequence[int], layer_hw: Sequence[int], input_hw: Sequence[int]) -> tuple[int, int]:
    """Pixel (y, x) at the centre of a unit at ``position`` of a ``layer_hw`` map, as
    :func:`pipeline.methods.receptive.unit_box` places it."""
    return tuple(min(int((p + 0.5) * n / m), n - 1)  # type: ignore[return-value]
                 for p, m, n in zip(position, layer_hw, input_hw))


def stride_grid_share(picture: Tensor, stride: Sequence[int]) -> float:
    """Share of a picture's (C, H, W) or (H, W) power, mean removed per channel, at the frequencies
    of a pattern that repeats every ``stride`` = (sy, sx) pixels (the lattice k * H / sy, l * W /
    sx, the DC term left out). White noise gives about sy * sx / (H * W); a picture dominated by
    the stride grid, near 1. NaN for a constant picture or a stride of 1."""
    p = picture.detach().double().cpu()
    p = p[None] if p.dim() == 2 else p
    h, w = p.shape[-2:]
    power = torch.fft.fft2(p - p.mean((-2, -1), keepdim=True)).abs().square().sum(0)
    power[0, 0] = 0.0
    total = float(power.sum())
    sy, sx = (max(1, int(s)) for s in stride)
    if total <= 0 or (sy == 1 and sx == 1):
        return math.nan
    ys = sorted({round(k * h / sy) % h for k in range(sy)})
    xs = sorted({round(k * w / sx) % w for k in range(sx)})
    return float(power[ys][:, xs].sum()) / total
