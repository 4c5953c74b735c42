"""Deconvnet projections (Zeiler & Fergus 2014): what in the input made one unit fire.

For a chosen layer and channel, keep only that channel's single strongest activation (zero
everything else) and map it back to pixel space by reversing the network: max-unpooling through
the switches recorded in the forward pass, ReLU on the reconstructed signal, and the transposed
convolution with the same filters (biases ignored).

Two versions:

* ``deconvnet_explicit`` walks a plain chain of Conv2d / ReLU / MaxPool2d / Identity / Dropout
  modules and performs those steps literally (the textbook algorithm).
* ``deconvnet`` works for any network (BatchNorm, residual blocks, ...): it is the gradient of the
  selected unit with respect to the input, with every ``nn.ReLU`` / ``nn.ReLU6`` module's backward
  replaced by ReLU of the incoming gradient. Max-pool's ordinary backward already routes the signal
  through the switches and a convolution's backward is the transposed convolution, so on chains the
  two versions agree. Functional ``F.relu`` calls are not overridden (as in Captum), since only
  modules can be hooked.

Both run the forward pass only up to the deepest selected layer.

What the picture shows: the ReLU of the backward signal does not look at the forward pass, so the
image enters only through max-pooling's switches (Mahendran & Vedaldi 2016, "Salient deconvolutional
networks"). Without max-pool layers (EfficientNet, most modern networks) a unit's projection is the
same pattern for every image, and each strided layer's transposed convolution spreads the signal
on its stride grid: a checkerboard. ``pipeline.methods.dependence`` measures both;
``pipeline.methods.guided.guided_projection`` is the projection that does depend on the image. The projection is of a unit
signal at the selected position times the activation there when ``scale_by_activation`` (Zeiler &
Fergus project the activation itself), or of a unit signal otherwise (what Captum's
``NeuronDeconvolution`` computes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import PipelineError
from pipeline.methods.ascent import _require_eval
from pipeline.methods.hooks import Call, get_layer, replacing_outputs, truncated_forward, watching


class DeconvResult(NamedTuple):
    """``projection`` (B, C, H, W) in input space; ``position`` (B, 2) long, the (y, x) of the kept
    activation in its layer's map ((0, 0) for a (B, C) layer); ``value`` (B,) that activation."""

    projection: Tensor
    position: Tensor
    value: Tensor


_HOOKED = "use pipeline.methods.deconvnet.deconvnet (the hooked version), which handles any network"


class NotAChain(PipelineError):
    """The explicit deconvnet cannot invert this network (not a plain Conv2d/ReLU/MaxPool2d chain):
    the hooked :func:`deconvnet` handles it."""


def _per_image(layer: str | Sequence[str], channel: int | Sequence[int],
               batch: int) -> tuple[list[str], list[int]]:
    layers = [layer] * batch if isinstance(layer, str) else list(layer)
    channels = [int(channel)] * batch if isinstance(channel, int) else [int(c) for c in channel]
    if len(layers) != batch or len(channels) != batch:
        raise PipelineError(f"got {len(layers)} layers and {len(channels)} channels for {batch} "
                            f"images: give one of each, or one per image")
    return layers, channels


def _check_input(x: Tensor) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise PipelineError(f"deconvnet needs a float (B, C, H, W) input, got {x.dtype} of shape "
                            f"{tuple(x.shape)}")


def _seeds(acts: dict[str, Tensor], layers: list[str], channels: list[int],
           scale_by_activation: bool) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Per layer, a tensor shaped like its output that is zero except at each image's max unit."""
    seeds = {name: torch.zeros_like(a) for name, a in acts.items()}
    positions = torch.zeros(len(layers), 2, dtype=torch.long)
    values = torch.zeros(len(layers), dtype=next(iter(acts.values())).dtype)
    for i, (name, c) in enumerate(zip(layers, channels)):
        a = acts[name]
        if a.dim() not in (2, 4):
            raise PipelineError(f"layer {name!r} has output shape {tuple(a.shape)}; deconvnet needs "
                                f"a (B, C, H, W) or (B, C) layer")
        if not 0 <= c < a.shape[1]:
            raise PipelineError(f"channel {c} is out of range for layer {name!r}, which has "
                                f"{a.shape[1]} channels: use 0..{a.shape[1] - 1}")
        fmap = a[i, c].reshape(1, 1) if a.dim() == 2 else a[i, c]
        flat = int(fmap.argmax())
        y, x = divmod(flat, fmap.shape[1])
        v = fmap[y, x].detach()
        index = (i, c) if a.dim() == 2 else (i, c, y, x)
        seeds[name][index] = v if scale_by_activation else 1.0
        positions[i] = torch.tensor([y, x])
        values[i] = v
    return seeds, positions, values


# --------------------------------------------------------------------------------------------
# General version: gradient with ReLU's backward replaced


class _DeconvReLU(torch.autograd.Function):
    """Forward: the module's ReLU (or ReLU6); backward: ReLU of the incoming gradient."""

    @staticmethod
    def forward(ctx: object, inp: Tensor, upper: float | None) -> Tensor:
        return inp.clamp(min=0.0, max=upper)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor, None]:
        return grad.clamp(min=0.0), None


def relu_modules(model: nn.Module) -> list[nn.Module]:
    """The ``nn.ReLU`` / ``nn.ReLU6`` modules of ``model``: what a ReLU backward override reaches."""
    return [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]


ReluRule = Callable[[nn.Module, tuple, Tensor], Tensor]


def deconv_rule(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    """The deconvnet's ReLU: the same forward values, and as its backward the ReLU of the incoming
    gradient, whatever the forward's sign was (Zeiler & Fergus)."""
    return _DeconvReLU.apply(inputs[0], 6.0 if isinstance(module, nn.ReLU6) else None)


@contextmanager
def relu_backward_override(model: nn.Module, rule: ReluRule) -> Iterator[None]:
    """Within the block, every ``nn.ReLU`` / ``nn.ReLU6`` module's output is ``rule(module, inputs,
    output)``: the same forward values, the rule's own backward. In-place ReLUs are made
    out-of-place (an in-place ReLU would overwrite the input a rule may read); every hook and flag
    is restored on exit. Functional ``F.relu`` calls are not reached, since only modules can be
    hooked."""
    relus = relu_modules(model)
    inplace = [m.inplace for m in relus]
    try:
        for m in relus:
            m.inplace = False
        with replacing_outputs(relus, rule):
            yield
    finally:
        for m, flag in zip(relus, inplace):
            m.inplace = flag


def unit_projection(model: nn.Module, x: Tensor, layer: str | Sequence[str], channel: int | Sequence[int],
                    relu_rule: ReluRule, *,
                    scale_by_activation: bool = True) -> DeconvResult:
    """The backward pass of each image's strongest unit of ``channel`` to the input, with every ReLU
    module's backward replaced by ``relu_rule`` (see :func:`relu_backward_override`): the
    deconvnet's rule here, guided backprop's in :func:`pipeline.methods.guided.guided_projection`.
    ``layer``/``channel`` are one value for the whole batch or one per image."""
    _require_eval(model, "a unit projection")
    _check_input(x)
    layers, channels = _per_image(layer, channel, x.shape[0])
    wanted = list(dict.fromkeys(layers))
    for name in wanted:
        get_layer(model, name)
    with relu_backward_override(model, relu_rule), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        acts = truncated_forward(model, xg, wanted)
        seeds, positions, values = _seeds(acts, layers, channels, scale_by_activation)
        (projection,) = torch.autograd.grad([acts[n] for n in wanted], [xg],
                                            grad_outputs=[seeds[n] for n in wanted])
    return DeconvResult(projection.detach(), positions, values)


def deconvnet(model: nn.Module, x: Tensor, layer: str | Sequence[str],
              channel: int | Sequence[int], *, scale_by_activation: bool = True) -> DeconvResult:
    """Deconvnet projection for any network, as a hooked backward pass.

    The ReLU modules' outputs are rerouted through a function whose backward is ReLU of the
    gradient; in-place ReLUs are made out-of-place for the call (an in-place ReLU would overwrite
    the value the override needs), and every hook and flag is restored in ``finally``. Nothing in
    that backward reads the image except max-pooling's switches: on a network without max-pool
    layers the projection of a unit is the same picture for every image (see :func:`max_pools_before`).
    """
    return unit_projection(model, x, layer, channel, deconv_rule, scale_by_activation=scale_by_activation)


MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
             nn.AdaptiveMaxPool3d)


def max_pools_before(model: nn.Module, x0: Tensor, layer: str) -> list[str]:
    """Names of the max-pool modules the forward pass on ``x0`` runs before ``layer``'s output: the
    switches through which a deconvnet's backward pass can depend on the image."""
    with watching(model, lambda _n, m: isinstance(m, MAX_POOLS)) as calls, torch.no_grad():
        truncated_forward(model, x0, [layer])
    return list(dict.fromkeys(c.name for c in calls))


# --------------------------------------------------------------------------------------------
# Explicit version: unpool, ReLU, transposed convolution on a plain chain of modules

_INVERTIBLE = (nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Identity, nn.Dropout, nn.Dropout2d)


def _record_chain(model: nn.Module, x: Tensor, wanted: list[str]
                  ) -> tuple[list[Call], dict[str, Tensor], dict[int, list[str]]]:
    """Run the forward up to the deepest wanted layer, recording each leaf module's call in order,
    and check that the calls form a chain from ``x`` of modules the explicit version can invert.
    Returns the calls, the layers' outputs, and for each call index the layers whose output it is."""
    with watching(model, lambda _n, m: next(m.children(), None) is None) as calls:
        acts = truncated_forward(model, x, wanted)
    prev = x
    for call in calls:
        if not isinstance(call.module, _INVERTIBLE):
            raise NotAChain(f"deconvnet_explicit cannot invert {type(call.module).__name__} at "
                                f"{call.name!r}: it handles only Conv2d, ReLU, MaxPool2d, Identity "
                                f"and Dropout; {_HOOKED}")
        if call.input is not prev:
            raise NotAChain(f"the forward of {type(model).__name__} is not a plain chain of "
                                f"modules before {call.name!r} (a functional op, a reshape or a "
                                f"residual connection sits in between); {_HOOKED}")
        if isinstance(call.module, nn.Conv2d) and call.module.padding_mode != "zeros":
            raise NotAChain(f"deconvnet_explicit needs zero padding, but {call.name!r} uses "
                                f"padding_mode={call.module.padding_mode!r}; {_HOOKED}")
        prev = call.output
    # Where each layer's signal enters the reversed chain: the last call producing its output (an
    # in-place ReLU returns the same tensor object as the conv before it).
    entry: dict[int, list[str]] = {}
    for name in wanted:
        ks = [k for k, call in enumerate(calls) if call.output is acts[name]]
        if not ks:
            raise NotAChain(f"layer {name!r}'s output is not the output of one module in the "
                                f"chain of {type(model).__name__}; {_HOOKED}")
        entry.setdefault(ks[-1], []).append(name)
    return calls, acts, entry


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding == "valid":
        return 0, 0
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in totals):
            raise NotAChain(f"deconvnet_explicit cannot invert 'same' padding that is "
                                f"asymmetric (kernel {conv.kernel_size}); {_HOOKED}")
        return totals[0] // 2, totals[1] // 2
    return conv.padding  # type: ignore[return-value]


def _invert_conv(conv: nn.Conv2d, g: Tensor, in_size: Sequence[int]) -> Tensor:
    """Transposed convolution with the layer's own weights (the flipped-filter convolution)."""
    pad = _conv_padding(conv)
    output_padding = tuple(
        size - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
        for size, o, s, p, d, k in zip(in_size, g.shape[2:], conv.stride, pad, conv.dilation,
                                       conv.kernel_size))
    return F.conv_transpose2d(g, conv.weight, None, conv.stride, pad, output_padding,
                              conv.groups, conv.dilation)


def _unpool(pool: nn.MaxPool2d, g: Tensor, inp: Tensor) -> Tensor:
    """Put the signal back at the switches (the argmax positions of the forward pass)."""
    _, switches = F.max_pool2d(inp, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                               pool.ceil_mode, return_indices=True)
    kernel = nn.modules.utils._pair(pool.kernel_size)
    stride = nn.modules.utils._pair(pool.stride or pool.kernel_size)
    if all(k <= s for k, s in zip(kernel, stride)) and pool.dilation in (1, (1, 1)):
        return F.max_unpool2d(g, switches, kernel, stride, output_size=inp.shape[2:])
    # Overlapping windows can share a switch: add their signals, as the pooling's transpose does.
    out = torch.zeros(*g.shape[:2], inp.shape[2] * inp.shape[3], dtype=g.dtype, device=g.device)
    out.scatter_add_(2, switches.flatten(2), g.flatten(2))
    return out.view_as(inp)


def deconvnet_explicit(model: nn.Module, x: Tensor, layer: str | Sequence[str],
                       channel: int | Sequence[int], *,
                       scale_by_activation: bool = True) -> DeconvResult:
    """Deconvnet by literally reversing a Conv2d/ReLU/MaxPool2d chain (Zeiler & Fergus, sec. 2.1).

    The forward is recorded module by module (hooks) up to the layer; then, from the layer down,
    each max-pool is undone with ``max_unpool2d`` at its switches, each ReLU applies ReLU to the
    reconstruction and each convolution applies ``conv_transpose2d`` with its weights, no bias.
    Raises ``PipelineError`` for any other module or a forward that is not a plain chain.
    """
    _require_eval(model, "deconvnet_explicit")
    _check_input(x)
    layers, channels = _per_image(layer, channel, x.shape[0])
    wanted = list(dict.fromkeys(layers))
    for name in wanted:
        get_layer(model, name)
    with torch.no_grad():
        calls, acts, entry = _record_chain(model, x, wanted)
        seeds, positions, values = _seeds(acts, layers, channels, scale_by_activation)
        g: Tensor | None = None
        for k in reversed(range(len(calls))):
            call = calls[k]
            for name in entry.get(k, []):
                g = seeds[name] if g is None else g + seeds[name]
            if g is None:
                continue
            m = call.module
            if isinstance(m, nn.Conv2d):
                g = _invert_conv(m, g, call.input.shape[2:])
            elif isinstance(m, nn.ReLU):
                g = F.relu(g)
            elif isinstance(m, nn.MaxPool2d):
                g = _unpool(m, g, call.input)
    projection = g if g is not None else torch.zeros_like(x)
    return DeconvResult(projection, positions, values)
