"""The one home of forward hooks: find a layer, capture its output (optionally stopping the forward
there), watch module calls, replace module outputs; plus target checks shared by the hook-based methods.

Gradients with respect to a captured output are taken with ``torch.autograd.grad(score, output)``
on the captured tensor itself, which needs neither module backward hooks (unreliable with in-place
ops, pytorch#61519) nor tensor hooks, and leaves parameters' ``.grad`` untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

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


# The one rule for a module that runs more than once in a forward pass (torchvision's BasicBlock
# calls its one ReLU twice): its output is the one of its FIRST call, in every stage and method.
# The forward can then stop right there, and extract, visualize and the explanations see the same
# tensor for the same name. `stage=layers` lists such modules with their number of calls; pick the
# enclosing block (e.g. ``layer1.0``) for a later call's output.
REUSED_MODULE_RULE = "first call"


class Capture:
    """The output of one layer in the current forward pass: its first call's (see ``REUSED_MODULE_RULE``)."""

    def __init__(self, name: str, retain: bool = True) -> None:
        self.name = name
        self.calls = 0
        self.retain = retain
        self._output: torch.Tensor | None = None
        self._version = 0

    def reset(self) -> None:
        """Forget the previous forward pass (a new forward of the model begins)."""
        self.calls = 0
        self._output = None

    def record(self, output: object) -> bool:
        """Count a call and keep its output when it is the first; True for the first call."""
        self.calls += 1
        if self.calls > 1:
            return False
        if not isinstance(output, torch.Tensor):
            raise PipelineError(
                f"Layer '{self.name}' returns {type(output).__name__}, not a tensor; "
                "pick a layer that outputs a single tensor (for example a conv layer or a block).")
        if self.retain:
            self._output = output
            self._version = output._version
        return True

    @property
    def output(self) -> torch.Tensor:
        """The recorded output; a PipelineError if the layer did not run or was changed in place."""
        if self._output is None:
            raise PipelineError(
                f"Layer '{self.name}' was not called during the forward pass (the forward never called it "
                "on this input); pick a layer that the model's forward uses.")
        if self._output._version != self._version:
            raise PipelineError(
                f"The output of layer '{self.name}' is modified in place later in the forward pass "
                "(an in-place ReLU or '+='), so its values and gradients are not the layer's; "
                "pick the layer that follows it (for example the ReLU or the whole block).")
        return self._output


class StopForward(Exception):
    """Raised from a forward hook to skip the rest of a forward pass once every wanted layer ran."""


class Recorder:
    """Forward hooks on named layers of ``model`` (see :func:`recording`).

    Each forward of the model starts afresh (a pre-hook on the model resets every capture). With
    ``stop`` the forward ends as soon as every layer has produced its output: :meth:`run` swallows
    this recorder's own stop signal, so recorders nest. ``on_output(name, tensor)`` sees each layer's
    output as it is made (e.g. to reduce it at once instead of keeping it: ``retain=False``).
    """

    def __init__(self, model: nn.Module, layers: Iterable[str], *, stop: bool = False, retain: bool = True,
                 on_output: Callable[[str, torch.Tensor], None] | None = None) -> None:
        wanted = list(dict.fromkeys(layers))
        if not wanted:
            raise PipelineError("No layers to capture: give at least one layer name.")
        self.model = model
        self.modules = {name: get_layer(model, name) for name in wanted}
        self.captures = {name: Capture(name, retain) for name in wanted}
        self.stop = stop
        self.on_output = on_output
        self._signal = StopForward()
        self._done = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __getitem__(self, name: str) -> Capture:
        return self.captures[name]

    def _reset(self, *_: object) -> None:
        self._done = 0
        for cap in self.captures.values():
            cap.reset()

    def _hook(self, name: str) -> Callable[[nn.Module, tuple, object], None]:
        cap = self.captures[name]

        def hook(_m: nn.Module, _i: tuple, out: object) -> None:
            if not cap.record(out):
                return
            if self.on_output is not None:
                self.on_output(name, out)
            self._done += 1
            if self.stop and self._done == len(self.captures):
                raise self._signal
        return hook

    def attach(self) -> None:
        """Register the hooks (the model's pre-hook first, so it runs before any capture)."""
        self._handles.append(self.model.register_forward_pre_hook(self._reset))
        self._handles += [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]

    def detach(self) -> None:
        """Remove every hook this recorder registered."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def run(self, x: torch.Tensor) -> torch.Tensor | None:
        """``model(x)``; None when the forward was stopped after the last wanted layer."""
        try:
            return self.model(x)
        except StopForward as err:
            if err is not self._signal:
                raise
            return None
        finally:
            self._signal.__traceback__ = None  # free the skipped frames' tensors now, not at the next gc

    def outputs(self) -> dict[str, torch.Tensor]:
        """Every layer's output of the last forward; a PipelineError naming a layer that did not run."""
        return {name: cap.output for name, cap in self.captures.items()}


@contextmanager
def recording(model: nn.Module, layers: Iterable[str], *, stop: bool = False, retain: bool = True,
              on_output: Callable[[str, torch.Tensor], None] | None = None) -> Iterator[Recorder]:
    """Capture ``layers`` while the block runs (see :class:`Recorder`); the hooks are always removed."""
    rec = Recorder(model, layers, stop=stop, retain=retain, on_output=on_output)
    try:
        rec.attach()
        yield rec
    finally:
        rec.detach()


@contextmanager
def capture(model: nn.Module, layer: str) -> Iterator[Capture]:
    """Record ``layer``'s forward output while the block runs; the hook is always removed."""
    with recording(model, [layer]) as rec:
        yield rec[layer]


def truncated_forward(model: nn.Module, x: torch.Tensor, layers: Iterable[str]) -> dict[str, torch.Tensor]:
    """Run ``model(x)`` only until every layer in ``layers`` has produced its output, and return those
    outputs (with their autograd graph): nothing after the deepest wanted layer runs."""
    with recording(model, layers, stop=True) as rec:
        rec.run(x)
        return rec.outputs()


def forward_until(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on ``x`` only as far as ``layer`` and return that layer's output."""
    return truncated_forward(model, x, [layer])[layer]


class Call(NamedTuple):
    """One call of a watched module: its name, the module, its positional inputs, its output and the
    output's version counter at the call (a later in-place change bumps the tensor's own; -1 if none)."""

    name: str
    module: nn.Module
    inputs: tuple
    output: object
    version: int

    @property
    def input(self) -> object:
        """The first positional input, None for a call without one."""
        return self.inputs[0] if self.inputs else None


@contextmanager
def watching(model: nn.Module, select: Callable[[str, nn.Module], bool]) -> Iterator[list[Call]]:
    """List every call of the named submodules that ``select(name, module)`` picks, in call order,
    while the block runs. A module that refuses hooks (TorchScript) is left out."""
    calls: list[Call] = []
    handles = []

    def hook_for(name: str) -> Callable[[nn.Module, tuple, object], None]:
        def hook(m: nn.Module, inputs: tuple, out: object) -> None:
            calls.append(Call(name, m, inputs, out, out._version if isinstance(out, torch.Tensor) else -1))
        return hook

    try:
        for name, m in model.named_modules():
            if name and select(name, m):
                try:
                    handles.append(m.register_forward_hook(hook_for(name)))
                except RuntimeError:  # ScriptModules take no hooks
                    pass
        yield calls
    finally:
        for h in handles:
            h.remove()


@contextmanager
def replacing_outputs(modules: Sequence[nn.Module],
                      replace: Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While the block runs, each module's output is ``replace(module, inputs, output)``: how
    deconvnet and guided backprop swap a ReLU's backward and how ablation zeroes channels."""
    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_hook(replace))
        yield
    finally:
        for h in handles:
            h.remove()


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


def check_images(x: object) -> torch.Tensor:
    """``x`` when it is a batch of images: a float tensor (B,C,H,W); else a PipelineError naming
    the problem and the fix."""
    if not isinstance(x, torch.Tensor):
        raise PipelineError(f"The images must be a torch tensor (B,C,H,W), got {type(x).__name__}; "
                            "convert them with the model's transform and torch.stack.")
    if x.dim() != 4:
        hint = " For one image (C,H,W), pass x[None]." if x.dim() == 3 else ""
        raise PipelineError(f"The images must be a batch (B,C,H,W), got shape {tuple(x.shape)}.{hint}")
    if not x.is_floating_point():
        raise PipelineError(f"The images must be floating point, got {x.dtype}; use the model's transform "
                            "(or x.float() / 255 and its normalisation).")
    return x


def channel_mismatch(model: nn.Module, x: torch.Tensor) -> PipelineError | None:
    """The error to raise when ``model``'s first conv reads another number of channels than the
    images ``x`` have (asked once the model has failed on them), else None."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None or first.in_channels == x.shape[1]:
        return None
    return PipelineError(f"The model's first conv reads {first.in_channels} channel(s) but the images have "
                         f"{x.shape[1]} (shape {tuple(x.shape)}); convert them with the model's transform "
                         "(a grayscale model takes 1 channel, an RGB model 3).")


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
