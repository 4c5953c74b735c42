"""Where a classifier's CAM head is: the conv layer and Linear that form a global-average-pooling +
linear head, or else the last spatial feature map, found by one traced forward pass.

Below both :mod:`pipeline.methods.base` (the CAM family's default layer) and
:mod:`pipeline.methods.cam` (CAM itself), so neither imports the other for it.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.methods.hooks import watching

CONVERSION_HINT = (
    "Convert it to a CAM localizer first (GapLocalizer: the trunk up to its last conv layer + "
    "global average pooling + a new Linear trained with fit_gap_head on pooled features), "
    "or use Grad-CAM, which works on any conv layer.")


class GapHead(NamedTuple):
    """Where CAM reads a network: ``layer`` (4-D maps), averaged and fed to Linear ``fc``."""

    layer: str
    fc: str


def _allclose(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(b.abs().max()) if b.numel() else 0.0
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, scale))


class _Trace(NamedTuple):
    """Every module's output from one forward pass, in completion order."""

    names: list[str]
    linear_inputs: list[object]  # a Linear's input, None for other modules
    outputs: list[object]
    feature_maps: list[int]  # indexes of honest 4-D outputs with more than one position
    logits: torch.Tensor


def _trace(model: nn.Module, x: torch.Tensor) -> _Trace:
    """Run ``model`` on ``x`` recording all module outputs; a feature map counts only if its
    module ran once and nothing changed the tensor in place afterwards."""
    with watching(model, lambda _n, _m: True) as seen, torch.no_grad():
        logits = model(x)
    calls = Counter(c.name for c in seen)
    names = [c.name for c in seen]
    linear_inputs = [c.input if isinstance(c.module, nn.Linear) else None for c in seen]
    outputs = [c.output for c in seen]
    versions = [c.version for c in seen]
    maps = [i for i, out in enumerate(outputs)
            if isinstance(out, torch.Tensor) and out._version == versions[i] and out.dim() == 4
            and out.shape[-2:].numel() > 1 and calls[names[i]] == 1]
    return _Trace(names, linear_inputs, outputs, maps, logits)


def last_feature_map(model: nn.Module, x: torch.Tensor) -> str:
    """The innermost layer returning the last spatial (4-D, more than 1x1) feature map, found by
    one forward pass on ``x``: the layer to convert a flatten + FC classifier at."""
    trace = _trace(model, x)
    if not trace.feature_maps:
        raise PipelineError(f"{type(model).__name__} has no layer with a spatial 4-D output "
                            "(B,C,H,W) that runs once per forward pass.")
    last = trace.outputs[trace.feature_maps[-1]]
    return next(trace.names[i] for i in trace.feature_maps if trace.outputs[i] is last)


def find_gap_head(model: nn.Module, x: torch.Tensor) -> GapHead:
    """Find the conv layer and Linear that form a GAP + linear head, by one forward pass on ``x``.

    The head's Linear is the last one that produces the logits; its layer is the first module
    (in completion order, so the innermost; called only once; output not changed in place later)
    whose 4-D output averaged over space equals that Linear's input. This finds pooling done by
    a module or by a plain ``mean``.
    Raises a PipelineError suggesting the localizer conversion when there is no such head.
    """
    trace = _trace(model, x)
    fc_index = next((i for i in range(len(trace.names) - 1, -1, -1)
                     if trace.linear_inputs[i] is not None
                     and isinstance(trace.outputs[i], torch.Tensor)
                     and _allclose(trace.outputs[i], trace.logits)), None)
    if fc_index is None:
        raise PipelineError(f"{type(model).__name__} has no Linear layer producing its logits, "
                            f"so CAM does not apply. {CONVERSION_HINT}")
    feats = trace.linear_inputs[fc_index]
    before = [i for i in trace.feature_maps if i < fc_index]
    if isinstance(feats, torch.Tensor) and feats.dim() == 2:
        for i in before:
            if _allclose(trace.outputs[i].mean(dim=(2, 3)), feats):
                return GapHead(trace.names[i], trace.names[fc_index])
    last = ""
    if before:  # name the innermost module that returned the last feature map
        last_out = trace.outputs[before[-1]]
        last_name = next(trace.names[i] for i in before if trace.outputs[i] is last_out)
        last = f" Its last conv feature map is '{last_name}'."
    raise PipelineError(
        f"{type(model).__name__} has no global-average-pooling + linear head: its logits layer "
        f"'{trace.names[fc_index]}' does not read the spatial mean of a conv feature map, so CAM "
        f"does not apply.{last} {CONVERSION_HINT}")
