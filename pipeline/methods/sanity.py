"""Sanity checks for saliency methods (Adebayo et al. 2018).

Model randomisation: re-initialise the layers one by one from the output side (a cascade) and see
whether the method's map changes; a map that barely moves does not depend on what the model
learned. Class check: maps for two different classes should differ. Methods are callables
``(model, x, target) -> map (B,H,W)``, so any method can be checked.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.methods.hooks import Target, get_layer

Method = Callable[[nn.Module, torch.Tensor, Target], torch.Tensor]


def rank_average(values: torch.Tensor) -> torch.Tensor:
    """Ranks (0-based) along the last dim, ties given the average of their ranks, as float64."""
    v = values.detach().double()
    n = v.shape[-1]
    flat = v.reshape(-1, n)
    sorted_v, order = flat.sort(dim=1, stable=True)
    pos = torch.arange(n, device=v.device).expand_as(flat)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[:, 1:] = sorted_v[:, 1:] != sorted_v[:, :-1]
    ends = torch.ones_like(flat, dtype=torch.bool)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(1).values
    last = torch.where(ends, pos, torch.full_like(pos, n)).flip(1).cummin(1).values.flip(1)
    ranks = torch.empty_like(flat)
    ranks.scatter_(1, order, (first + last).double() / 2)
    return ranks.view(v.shape)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per image between maps a and b (B,...) -> (B,); NaN if a map is
    constant (as scipy.stats.spearmanr)."""
    if a.shape != b.shape:
        raise PipelineError(f"Cannot correlate maps of shapes {tuple(a.shape)} and "
                            f"{tuple(b.shape)}.")
    ra, rb = rank_average(a.flatten(1)), rank_average(b.flatten(1))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a - b|| / max(||a||, ||b||) per image, in [0, 2]; 0 when both maps are zero."""
    a, b = a.detach().flatten(1).double(), b.detach().flatten(1).double()
    scale = torch.maximum(a.norm(dim=1), b.norm(dim=1))
    return torch.where(scale > 0, (a - b).norm(dim=1) / scale.clamp_min(1e-300),
                       torch.zeros_like(scale))


def parameter_layers(model: nn.Module) -> list[str]:
    """Names of the modules that own parameters directly, output side first (reverse of
    registration order, which follows the forward order in most models)."""
    names = [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    return names[::-1]


def reinitialize(module: nn.Module, seed: int) -> None:
    """Re-draw every parameter under ``module`` with a seeded RNG (global RNG state is restored).

    Submodules with ``reset_parameters`` use their own initialisation (Kaiming-uniform for conv
    and linear layers, weight 1 / bias 0 and fresh running statistics for norm layers); other
    parameters are redrawn from a normal with their current standard deviation (1 if undefined).
    """
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        covered: set[int] = set()
        for sub in module.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
                covered.update(id(p) for p in sub.parameters())
        for p in module.parameters():
            if id(p) not in covered:
                std = float(p.std()) if p.numel() > 1 else 0.0
                p.normal_(0.0, std if std > 0 else 1.0)


class CascadeStep(NamedTuple):
    """After randomising ``layer`` and every layer above it: the map (B,H,W) and its Spearman
    correlation (B,) with the original model's map."""

    layer: str
    spearman: torch.Tensor
    map: torch.Tensor


def cascading_randomization(model: nn.Module, x: torch.Tensor, target: Target, method: Method,
                            layers: Sequence[str] | None = None,
                            seed: int = 0) -> tuple[torch.Tensor, list[CascadeStep]]:
    """Adebayo et al.'s cascading model-parameter randomisation on a deep copy of ``model``.

    ``layers`` (default :func:`parameter_layers`) are randomised in the given order, output side
    first, layer i with seed ``seed + i``; each step keeps the earlier randomisations. Returns the
    original map and one :class:`CascadeStep` per layer. ``model`` itself is not changed.
    """
    names = parameter_layers(model) if layers is None else list(layers)
    for name in names:
        get_layer(model, name)
    original = method(model, x, target).detach()
    randomized = copy.deepcopy(model)
    steps = []
    for i, name in enumerate(names):
        reinitialize(get_layer(randomized, name), seed + i)
        m = method(randomized, x, target).detach()
        steps.append(CascadeStep(name, spearman(original, m), m))
    return original, steps


class ClassCheck(NamedTuple):
    """Maps for two classes (B,H,W each), their Spearman correlation and relative L2 difference
    (B,). A class-sensitive method gives a correlation well below 1 and a clearly non-zero
    difference."""

    map_a: torch.Tensor
    map_b: torch.Tensor
    spearman: torch.Tensor
    relative_l2: torch.Tensor


def class_check(model: nn.Module, x: torch.Tensor, target_a: Target, target_b: Target,
                method: Method) -> ClassCheck:
    """Compare the method's maps for two target classes on the same images."""
    a = method(model, x, target_a).detach()
    b = method(model, x, target_b).detach()
    return ClassCheck(a, b, spearman(a, b), relative_l2(a, b))
