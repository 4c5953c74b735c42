"""The one interface every map method shares, and the base classes that own its plumbing.

A method is a small class: a ``name``, a ``version`` (bumped when its output would change), its
settings (``DEFAULTS``: exactly what enters the cache key, after :meth:`MapMethod.prepare` has
resolved the ones that depend on the model, such as a default layer) and one batched call,
:meth:`MapMethod.attribute` ``(model, x (B,C,H,W), target (B,)) -> Explanation`` whose ``maps``
are (B,H,W) at the input's resolution. Knobs that change speed or memory but not the result
(``OPTIONS``, such as a batch size) stay out of the key.

:class:`LayerMethod` owns what the CAM family shares (as pytorch-grad-cam's ``BaseCAM``): the
layer lookup, one forward (and backward) pass with the layer's output captured, the weighted
channel sum, ReLU and the upsampling; each CAM variant overrides one function.

:func:`shared_pass` serves several methods from one forward and one backward pass: a method that can
take its map from the logits, captured layer outputs and the target score's gradients there and at
the input says what it needs (:meth:`MapMethod.shared_needs`) and builds its map from the pass
(:meth:`MapMethod.from_pass`). Saliency, Grad-CAM and CAM on one batch then cost one forward and
one backward instead of three forwards and two backwards, with the same maps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from pipeline.errors import PipelineError, suggest
from pipeline.methods.execution import is_scripted, low_precision_active, on_fast_model, pass_size
from pipeline.methods.heads import find_gap_head, last_feature_map
from pipeline.methods.hooks import (Target, capture, check_target, forward_until, require_conv_output,
                                    upsample)


class NotApplicable(PipelineError):
    """A method that cannot run on this model; the message is one line naming why and the fix."""


@dataclass
class Explanation:
    """What a method returns for a batch: ``maps`` (B,H,W), optional per-image ``extras`` (each
    (B,...), saved beside the map) and optional per-image JSON-able ``meta`` (a list of B dicts)."""

    maps: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: list[dict[str, Any]] = field(default_factory=list)

    def contiguous(self) -> Explanation:
        """The same explanation with every tensor in the default memory layout."""
        return Explanation(self.maps.contiguous(), {k: v.contiguous() for k, v in self.extras.items()}, self.meta)


@dataclass(frozen=True)
class PassNeeds:
    """What a method takes from a shared pass: layer outputs to capture, the layers where it also
    needs the target score's gradient, and whether it needs the gradient at the input."""

    layers: frozenset[str] = frozenset()
    layer_grads: frozenset[str] = frozenset()
    input_grad: bool = False

    def __or__(self, other: PassNeeds) -> PassNeeds:
        return PassNeeds(self.layers | other.layers, self.layer_grads | other.layer_grads,
                         self.input_grad or other.input_grad)


@dataclass
class SharedPass:
    """One forward (and backward) pass over ``x``: the logits, the targets used (the predicted
    classes when none were given), the captured layer outputs (detached), the target score's
    gradients at the layers that asked for them, and at the input when asked."""

    x: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor
    acts: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]
    input_grad: torch.Tensor | None

    def contiguous(self) -> SharedPass:
        """The same pass with every tensor in the default memory layout."""
        return SharedPass(self.x.contiguous(), self.logits, self.targets,
                          {k: v.contiguous() for k, v in self.acts.items()}, {k: v.contiguous() for k, v in self.grads.items()},
                          None if self.input_grad is None else self.input_grad.contiguous())

    def subset(self, idx: torch.Tensor) -> SharedPass:
        """The pass restricted to the images ``idx`` (an index tensor)."""
        return SharedPass(self.x[idx], self.logits[idx], self.targets[idx],
                          {k: v[idx] for k, v in self.acts.items()}, {k: v[idx] for k, v in self.grads.items()},
                          None if self.input_grad is None else self.input_grad[idx])


class LocalizerSource(Protocol):
    """What CAM asks of the stage running it when the model needs a fitted GAP localizer."""

    def gap_localizer(self, model: nn.Module, layer: str, fit: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
        """The converted model (with a ``head``) at ``layer``, its Linear fitted with ``fit``, and
        facts about the fit (with a ``key``)."""
        ...


class MapMethod:
    """Base of every map method: settings, validation, the batched call."""

    name: ClassVar[str]
    title: ClassVar[str] = ""                 # how people write it (Grad-CAM); defaults to the name
    version: ClassVar[int] = 1
    DEFAULTS: ClassVar[dict[str, Any]] = {}   # settings that change the map: the cache key
    OPTIONS: ClassVar[dict[str, Any]] = {}    # speed/memory knobs that do not change the map
    needs_hooks: ClassVar[bool] = False       # forward hooks: not on TorchScript modules
    produces_mask: ClassVar[bool] = False     # a 0/1 mask, not a ranking: no curves, no sanity ranks
    many_passes: ClassVar[bool] = False       # many forward passes per image: checks use fewer images
    fast_model: ClassVar[bool] = False        # attribute runs on the model as on_fast_model runs it
    description: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A ``fast_model`` method's own ``attribute`` is wrapped to run as :func:`on_fast_model` does
        (a nested call, such as ``super().attribute``, finds the model already there)."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("attribute")
        if own is not None:
            cls.attribute = _fast_attribute(own)  # type: ignore[method-assign]

    def __init__(self, **settings: Any) -> None:
        known = {**self.DEFAULTS, **self.OPTIONS}
        for key in settings:
            if key not in known:
                raise PipelineError(f"explain.{self.name}.{key} is not a setting of {self.name}."
                                    f"{suggest(key, known)} Settings: {', '.join(known) or 'none'}.")
        self.settings: dict[str, Any] = {k: settings.get(k, v) for k, v in self.DEFAULTS.items()}
        self.options: dict[str, Any] = {k: settings.get(k, v) for k, v in self.OPTIONS.items()}
        self.validate()

    @property
    def label(self) -> str:
        """The method's name as people write it, for messages."""
        return self.title or self.name

    def validate(self) -> None:
        """Check the settings (raise a PipelineError naming the setting and its valid values)."""

    def prepare(self, model: nn.Module, x0: torch.Tensor, env: LocalizerSource | None = None) -> MapMethod:
        """Resolve model-dependent settings on one example input ``x0`` (1,C,H,W) and check that the
        method applies (a :class:`NotApplicable` otherwise). Returns ``self``."""
        if self.needs_hooks and is_scripted(model):
            raise NotApplicable(f"{self.label} needs forward hooks, which TorchScript modules do not take: "
                                "load the model with model=exported (torch.export) or as an nn.Module instead.")
        if "low_precision" in self.settings:  # the key holds what runs: bfloat16 only where it is native
            self.settings["low_precision"] = self.settings["low_precision"] and low_precision_active(x0.device)
        return self

    def conversion_facts(self) -> dict[str, Any] | None:
        """Facts about a model conversion the prepared method runs on (a fitted localizer), if any."""
        return None

    def sanity_note(self) -> str:
        """Why the randomisation check does not apply to this prepared method ('' when it does)."""
        return ""

    def attribute(self, model: nn.Module, x: torch.Tensor, target: Target) -> Explanation:
        """Maps (B,H,W) of ``target`` (one class per image, or one for all) for the batch ``x``."""
        raise NotImplementedError

    def __call__(self, model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
        """The maps alone: the ``(model, x, target) -> maps`` form metrics and sanity checks take."""
        return self.attribute(model, x, target).maps

    def shared_needs(self) -> PassNeeds | None:
        """What the prepared method can take from a :func:`shared_pass` on the model it is called
        with (None: it runs its own passes)."""
        return None

    def from_pass(self, model: nn.Module, p: SharedPass) -> Explanation:
        """The method's explanation from a shared pass that met :meth:`shared_needs`; equal to
        :meth:`attribute` with the pass's targets."""
        raise NotImplementedError(f"{self.name} takes nothing from a shared pass")

    def key_settings(self) -> dict[str, Any]:
        """The settings that enter the cache key (plain JSON values)."""
        return dict(self.settings)

    def _choice(self, key: str, choices: tuple[str, ...]) -> None:
        value = str(self.settings[key])
        if value not in choices:
            raise PipelineError(f"explain.{self.name}.{key}={value} is not valid.{suggest(value, choices)} "
                                f"Use one of {', '.join(choices)}.")
        self.settings[key] = value

    def _flag(self, key: str) -> None:
        if not isinstance(self.settings[key], bool):
            raise PipelineError(f"explain.{self.name}.{key} must be true or false, got {self.settings[key]!r}.")

    def _positive(self, *keys: str, store: dict[str, Any] | None = None, integer: bool = True) -> None:
        where = self.settings if store is None else store
        for key in keys:
            value = where[key]
            ok = isinstance(value, int) and not isinstance(value, bool) if integer else isinstance(value, (int, float))
            if not ok or value <= 0:
                raise PipelineError(f"explain.{self.name}.{key} must be a positive "
                                    f"{'integer' if integer else 'number'}, got {value!r}.")


Attribute = Callable[[MapMethod, nn.Module, torch.Tensor, Target], Explanation]


def _fast_attribute(attribute: Attribute) -> Attribute:
    @functools.wraps(attribute)
    def run(self: MapMethod, model: nn.Module, x: torch.Tensor, target: Target) -> Explanation:
        if not self.fast_model:
            return attribute(self, model, x, target)
        return on_fast_model(lambda m, b: attribute(self, m, b, target), model, x).contiguous()
    return run


def targets_for(logits: torch.Tensor, target: Target) -> torch.Tensor:
    """Validated per-image target classes on the logits' device."""
    return check_target(target, logits.shape[1], logits.shape[0]).to(logits.device)


def shared_pass(model: nn.Module, x: torch.Tensor, target: Target | None, needs: PassNeeds) -> SharedPass:
    """One forward pass per :func:`pass_size` images with ``needs.layers`` captured and, when any
    gradient is needed, one backward pass of the target scores to the input and those layers
    together, on the model as the methods' own calls run it (:func:`on_fast_model`). ``target``
    None takes each image's predicted class."""
    return on_fast_model(lambda m, b: _shared_pass(m, b, target, needs), model, x).contiguous()


def _shared_pass(model: nn.Module, x: torch.Tensor, target: Target | None, needs: PassNeeds) -> SharedPass:
    t_all = None if target is None else check_target(target, None, x.shape[0])
    want_grad = needs.input_grad or bool(needs.layer_grads)
    step = pass_size(model, x)
    parts: list[SharedPass] = []
    for i in range(0, x.shape[0], step):
        part = x[i:i + step].detach().requires_grad_(want_grad)
        with ExitStack() as stack, torch.set_grad_enabled(want_grad):
            caps = {layer: stack.enter_context(capture(model, layer)) for layer in sorted(needs.layers)}
            logits = model(part)
        acts = {layer: cap.output for layer, cap in caps.items()}
        t = logits.detach().argmax(1) if t_all is None else targets_for(logits, t_all[i:i + step])
        grads: dict[str, torch.Tensor] = {}
        input_grad = None
        if want_grad:
            layers = sorted(needs.layer_grads)
            sources = ([part] if needs.input_grad else []) + [acts[layer] for layer in layers]
            got = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), sources, allow_unused=True)
            input_grad = got[0] if needs.input_grad else None
            for layer, g in zip(layers, got[1:] if needs.input_grad else got):
                if g is None:
                    raise PipelineError(f"Layer '{layer}' does not feed the model's output; pick a layer on "
                                        "the path from the input to the logits.")
                grads[layer] = g
        parts.append(SharedPass(part.detach(), logits.detach(), t, {k: v.detach() for k, v in acts.items()},
                                grads, input_grad))
    if len(parts) == 1:
        return parts[0]
    return SharedPass(x.detach(), torch.cat([q.logits for q in parts]), torch.cat([q.targets for q in parts]),
                      {k: torch.cat([q.acts[k] for q in parts]) for k in parts[0].acts},
                      {k: torch.cat([q.grads[k] for q in parts]) for k in parts[0].grads},
                      None if parts[0].input_grad is None else torch.cat([q.input_grad for q in parts]))


def default_layer(model: nn.Module, x0: torch.Tensor) -> str:
    """The layer the GAP head reads, else the last spatial feature map: where CAMs look by default."""
    try:
        return find_gap_head(model, x0).layer
    except PipelineError:
        return last_feature_map(model, x0)


class LayerMethod(MapMethod):
    """A CAM-style method at one conv layer: ``relu(sum_c w_c A_c)`` upsampled to the input, where
    a subclass defines the weights (:meth:`weights`) or the whole low-resolution map (:meth:`cam`)."""

    DEFAULTS: ClassVar[dict[str, Any]] = {"layer": None}
    needs_hooks = True
    uses_gradients: ClassVar[bool] = True
    fast_model = True

    def prepare(self, model: nn.Module, x0: torch.Tensor, env: LocalizerSource | None = None) -> MapMethod:
        super().prepare(model, x0, env)
        if self.settings["layer"] is None:
            self.settings["layer"] = default_layer(model, x0)
        layer = str(self.settings["layer"])
        with torch.no_grad():
            require_conv_output(forward_until(model, layer, x0), layer, model, self.label)
        self.settings["layer"] = layer
        return self

    @property
    def layer(self) -> str:
        if self.settings["layer"] is None:
            raise PipelineError(f"{self.label} has no layer: call prepare(model, x0) or give layer=...")
        return str(self.settings["layer"])

    def weights(self, act: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        """Channel weights (B,C) from the layer's output and the target score's gradient there."""
        raise NotImplementedError

    def cam(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, act: torch.Tensor,
            grad: torch.Tensor | None) -> torch.Tensor:
        """The low-resolution map (B,h,w) before the ReLU."""
        return torch.einsum("bc,bchw->bhw", self.weights(act, grad), act)

    def activations(self, model: nn.Module, x: torch.Tensor, target: Target
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The layer's output, the gradient of the target scores there (None without gradients)
        and the validated targets, from one forward (and backward) pass."""
        layer = self.layer
        if not self.uses_gradients:
            with torch.no_grad(), capture(model, layer) as cap:
                logits = model(x)
            act = cap.output
            require_conv_output(act, layer, model, self.label)
            return act, None, targets_for(logits, target)
        x = x.detach().requires_grad_(True)  # builds the graph even when parameters are frozen
        with torch.enable_grad(), capture(model, layer) as cap:
            logits = model(x)
        act = cap.output
        require_conv_output(act, layer, model, self.label)
        t = targets_for(logits, target)
        (grad,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), act, allow_unused=True)
        if grad is None:
            raise PipelineError(f"Layer '{layer}' does not feed the model's output; pick a layer on "
                                "the path from the input to the logits.")
        return act.detach(), grad, t

    def shared_needs(self) -> PassNeeds | None:
        if self.many_passes:
            return None  # its own passes dominate; it keeps its own batching
        layer = frozenset({self.layer})
        return PassNeeds(layer, layer if self.uses_gradients else frozenset())

    def from_pass(self, model: nn.Module, p: SharedPass) -> Explanation:
        act = p.acts[self.layer]
        require_conv_output(act, self.layer, model, self.label)
        cam = torch.relu(self.cam(model, p.x, p.targets, act, p.grads.get(self.layer)))
        return Explanation(upsample(cam, tuple(p.x.shape[-2:])))

    def attribute(self, model: nn.Module, x: torch.Tensor, target: Target) -> Explanation:
        step = pass_size(model, x)
        t_all = check_target(target, None, x.shape[0])
        maps = []
        for i in range(0, x.shape[0], step):
            part = x[i:i + step]
            act, grad, t = self.activations(model, part, t_all[i:i + step])
            maps.append(torch.relu(self.cam(model, part, t, act, grad)))
        return Explanation(upsample(torch.cat(maps), tuple(x.shape[-2:])))
