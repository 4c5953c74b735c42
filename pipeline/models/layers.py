"""Addressable layers of a model: names, types, output shapes, glob selection and defaults."""

from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import PipelineError, suggest
from pipeline.methods.hooks import watching


@dataclass(frozen=True)
class LayerInfo:
    """A named module, the shape of its output for one input image (without the batch) and how many
    times one forward pass calls it (more than 1: a reused module, read at its first call)."""

    name: str
    type: str
    shape: tuple[int, ...] | None
    calls: int = 0


def layer_table(module: nn.Module, input_shape: tuple[int, ...]) -> list[LayerInfo]:
    """Every named submodule with its output shape and call count, found by one forward pass on zeros."""
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with watching(module, lambda _n, _m: True) as seen, torch.no_grad():
        module(torch.zeros(1, *input_shape, device=device))
    shapes: dict[str, tuple[int, ...]] = {}
    calls: Counter[str] = Counter()
    for call in seen:
        calls[call.name] += 1
        if isinstance(call.output, torch.Tensor) and call.name not in shapes:
            shapes[call.name] = tuple(call.output.shape[1:])
    return [LayerInfo(n, type(m).__name__, shapes.get(n), calls[n]) for n, m in module.named_modules() if n]


def resolve_layers(module: nn.Module, patterns: list[str] | str) -> list[str]:
    """Expand names and globs (``features.*``) into module names, in model order.

    An unknown name is an error that lists the close matches.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    names = [n for n, _ in module.named_modules() if n]
    out: list[str] = []
    for pat in patterns:
        if any(ch in pat for ch in "*?["):
            hits = fnmatch.filter(names, pat)
        else:
            hits = [pat] if pat in names else []
        if not hits:
            raise PipelineError(f"unknown layer '{pat}'.{suggest(pat, names)} "
                                "List the layers with `python -m pipeline stage=layers`.")
        out.extend(h for h in hits if h not in out)
    order = {n: i for i, n in enumerate(names)}
    return sorted(out, key=order.__getitem__)


def guess_default_layers(module: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    """Each block's output (the last top-level module at each spatial size) and the last conv.

    Top-level Sequentials of plain layers (VGG's ``features``) are looked into.
    """
    info = {li.name: li for li in layer_table(module, input_shape)}
    candidates: list[str] = []
    for name, child in module.named_children():
        li = info.get(name)
        if li is None or li.shape is None or len(li.shape) != 3:
            continue
        if isinstance(child, nn.Sequential) and len(child) > 0 and all(
                next(c.children(), None) is None for c in child.children()):
            candidates.extend(f"{name}.{c}" for c, _ in child.named_children())
        else:
            candidates.append(name)
    picked: list[str] = []
    for i, name in enumerate(candidates):
        shape = info[name].shape
        nxt = info[candidates[i + 1]].shape if i + 1 < len(candidates) else None
        if shape is not None and len(shape) == 3 and shape[1] * shape[2] > 1 and (
                nxt is None or nxt[1:] != shape[1:]):
            picked.append(name)
    convs = [n for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]
    if convs and convs[-1] not in picked:
        picked.append(convs[-1])
    return picked
