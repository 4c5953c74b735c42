"""Helpers shared by the hook-based methods: find a layer, capture its output, check targets.

Gradients with respect to a captured output are taken with ``torch.autograd.grad(score, output)``
on the captured tensor itself, which needs neither module backward hooks (unreliable with in-place
ops, pytorch#61519) nor tensor hooks, and leaves parameters' ``.grad`` untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from pipeline.errors import PipelineError, suggest

Target = int | Sequence[int] | torch.Tensor


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule called ``name`` (a dotted name from ``model.named_modules()``)."""
    modules = dict(model.named_modules())
    if name not in modules:
        names = [n for n in modules if n]
        hint = suggest(name, names) or f" Layers include: {', '.join(names[:12])}."
        raise PipelineError(
            f"Unknown layer '{name}' in {type(model).__name__}.{hint} "
            "Layers are dotted names from model.named_modules().")
    return modules[name]


def conv_layer_names(model: nn.Module) -> list[str]:
    """Names of the ``nn.Conv2d`` layers, to suggest when a layer is not convolutional."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


class Capture:
    """The output of one layer recorded during a forward pass (see :func:`capture`)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self._output: torch.Tensor | None = None
        self._version = 0

    def record(self, output: object) -> None:
        """Keep the layer's output (the last one when the layer runs several times)."""
        if not isinstance(output, torch.Tensor):
            raise PipelineError(
                f"Layer '{self.name}' returns {type(output).__name__}, not a tensor; "
                "pick a layer that outputs a single tensor (for example a conv layer or a block).")
        self.calls += 1
        self._output = output
        self._version = output._version

    @property
    def output(self) -> torch.Tensor:
        """The recorded output; a PipelineError if the layer did not run or was changed in place."""
        if self._output is None:
            raise PipelineError(
                f"Layer '{self.name}' was not called during the forward pass; "
                "pick a layer that the model's forward uses.")
        if self._output._version != self._version:
            raise PipelineError(
                f"The output of layer '{self.name}' is modified in place later in the forward pass "
                "(an in-place ReLU or '+='), so its values and gradients are not the layer's; "
                "pick the layer that follows it (for example the ReLU or the whole block).")
        return self._output


@contextmanager
def capture(model: nn.Module, layer: str) -> Iterator[Capture]:
    """Record ``layer``'s forward output while the block runs; the hook is always removed."""
    cap = Capture(layer)
    handle = get_layer(model, layer).register_forward_hook(lambda _m, _i, out: cap.record(out))
    try:
        yield cap
    finally:
        handle.remove()


def check_target(target: Target, num_classes: int | None, batch: int | None = None) -> torch.Tensor:
    """Validate target class indices and return them as a 1-D int64 tensor (length ``batch``).

    A single int is broadcast to the whole batch; a sequence or tensor gives one target per image.
    ``num_classes=None`` leaves the range to a later check (on the logits).
    """
    t = torch.as_tensor(target)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise PipelineError(f"Target classes must be integers, got dtype {t.dtype}.")
    t = t.reshape(-1).long()
    if t.numel() == 0:
        raise PipelineError("No target class given.")
    bad = t[(t < 0) | (t >= num_classes)] if num_classes is not None else t[:0]
    if bad.numel():
        raise PipelineError(
            f"Target class {int(bad[0])} is out of range: the model has {num_classes} classes "
            f"(0..{num_classes - 1}). Pick a class index in that range.")
    if batch is not None:
        if t.numel() == 1:
            t = t.expand(batch)
        elif t.numel() != batch:
            raise PipelineError(
                f"Got {t.numel()} target classes for {batch} images; give one per image or a "
                "single class for all.")
    return t


def require_conv_output(output: torch.Tensor, layer: str, model: nn.Module, method: str) -> None:
    """Raise a PipelineError naming conv layers when ``layer``'s output is not a (B,C,H,W) map."""
    if output.dim() != 4:
        convs = conv_layer_names(model)
        hint = f" Convolutional layers: {', '.join(convs[-8:])}." if convs else ""
        raise PipelineError(
            f"{method} needs a convolutional layer with a 4-D output (B,C,H,W), but layer "
            f"'{layer}' outputs shape {tuple(output.shape)}.{hint}")


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (B,h,w) maps to (B,*size) bilinearly with ``align_corners=False``."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return nn.functional.interpolate(maps[:, None], size=size, mode="bilinear",
                                     align_corners=False)[:, 0]


class _StopForward(Exception):
    """Raised by :func:`forward_until`'s hook to skip the rest of the forward pass."""


def forward_until(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on ``x`` only as far as ``layer``'s first call and return that layer's output.

    The rest of the network is skipped by raising from the layer's forward hook, so this works for
    any architecture without rebuilding it; each call owns its own stop signal, so calls nest.
    """
    stop = _StopForward()
    cap = Capture(layer)

    def hook(_m: nn.Module, _i: object, out: object) -> None:
        cap.record(out)
        raise stop

    handle = get_layer(model, layer).register_forward_hook(hook)
    try:
        model(x)
    except _StopForward as err:
        if err is not stop:
            raise
    finally:
        handle.remove()
        stop.__traceback__ = None  # free the skipped frames' tensors now, not at the next gc cycle
    return cap.output
