"""How each layer of a traced model is recomputed over a changed box (Krypton): which ops pass the box
through unchanged, merge boxes, need whole tensors, or are windowed (convolutions, pooling and
size-dependent padding found by probing), with their multiply-add counts (see
:mod:`pipeline.methods.occlusion.krypton`)."""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F


logger = logging.getLogger(__name__)

# Modules that act on each element (or, in eval mode, each channel) independently: the changed box
# passes through unchanged.
POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.LeakyReLU, nn.ELU, nn.SELU,
    nn.CELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.PReLU,
    nn.Identity, nn.Dropout, nn.Dropout2d, nn.BatchNorm2d,
)
POINTWISE_FUNCTIONS: frozenset[Any] = frozenset({
    F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu,
    F.mish, F.softplus, torch.relu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, operator.neg,
    torch.neg, torch.exp, torch.abs, operator.abs,
})
POINTWISE_METHODS: frozenset[str] = frozenset({
    "relu", "sigmoid", "tanh", "neg", "abs", "exp", "contiguous", "clamp", "clip",
})
MERGE_FUNCTIONS: frozenset[Any] = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
    torch.div,
})
MERGE_METHODS: frozenset[str] = frozenset({"add", "sub", "mul", "div"})
CAT_FUNCTIONS: frozenset[Any] = frozenset({torch.cat, torch.concat})
# Ops that need the whole tensor by nature: not worth a log line above DEBUG.
GLOBAL_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Flatten, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Softmax, nn.LogSoftmax,
)
GLOBAL_FUNCTIONS: frozenset[Any] = frozenset({
    torch.flatten, torch.mean, torch.sum, torch.amax, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
    F.linear, torch.reshape, getattr,
})
GLOBAL_METHODS: frozenset[str] = frozenset({
    "flatten", "view", "reshape", "mean", "sum", "amax", "max", "size", "squeeze",
})


class LeafTracer(fx.Tracer):
    """Keeps every module without children (and torch.nn's own modules) as one graph node, so that
    size-dependent padding modules stay opaque and are recognised by probing."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return next(m.children(), None) is None or super().is_leaf_module(m, module_qualified_name)


# ----------------------------------------------------------------------------------------------
# Layer rules


@dataclass
class Window:
    """A sliding-window op run with padding 0 on a pre-padded input: conv, pooling."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, bottom, left, right
    pad_value: float
    macs_per_pixel: int  # multiply-adds per output pixel (0 for pooling)
    whole: Callable[[torch.Tensor], torch.Tensor] | None = None  # the op on an unpadded full map
    weight: torch.Tensor | None = None  # a convolution's (BatchNorm-folded) weight: fn is linear
    groups: int = 1                     # plus a bias, so a change of its input maps linearly


@dataclass
class Rule:
    """How one graph node is evaluated: kind is input, const, window, pointwise, alias (passes its
    input through: a BatchNorm folded into its conv), merge, cat, pad, dense or output."""

    kind: str
    window: Window | None = None
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    reason: str = ""
    dense_macs: int = 0  # multiply-adds of the node computed in full for one image
    inplace: nn.Module | None = None  # in-place activation copy, may overwrite its input patch


def pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_rule(m: nn.Conv2d, in_shape: torch.Size, out_shape: torch.Size) -> Rule:
    k, s, d = pair(m.kernel_size), pair(m.stride), pair(m.dilation)
    if m.padding_mode != "zeros":
        return Rule("dense", reason=f"Conv2d with padding_mode={m.padding_mode!r}")
    if isinstance(m.padding, str):
        pads = [0, 0, 0, 0]
        if m.padding == "same":
            for axis in range(2):
                total = d[axis] * (k[axis] - 1)
                pads[2 * axis], pads[2 * axis + 1] = total // 2, total - total // 2
        top, bottom, left, right = pads
    else:
        (top, left) = pair(m.padding)
        bottom, right = top, left

    def run(win: torch.Tensor) -> torch.Tensor:
        return F.conv2d(win, m.weight, m.bias, s, 0, d, m.groups)

    macs = m.out_channels * (m.in_channels // m.groups) * k[0] * k[1]
    rule = window_rule(run, k, s, d, (top, bottom, left, right), 0.0, macs, in_shape, out_shape,
                        "Conv2d")
    if rule.window is not None:
        rule.window.weight, rule.window.groups = m.weight, m.groups
    return rule


def window_rule(fn: Callable[[torch.Tensor], torch.Tensor], k: tuple[int, int],
                 s: tuple[int, int], d: tuple[int, int], pads: tuple[int, int, int, int],
                 value: float, macs: int, in_shape: torch.Size, out_shape: torch.Size,
                 what: str, extend: bool = False) -> Rule:
    """A window rule after checking that the padded input yields the cached output size; with
    ``extend`` (max-pool ceil mode) the bottom/right padding grows to reach the last window."""
    top, bottom, left, right = pads
    need_h = (out_shape[2] - 1) * s[0] + d[0] * (k[0] - 1) + 1
    need_w = (out_shape[3] - 1) * s[1] + d[1] * (k[1] - 1) + 1
    if extend:
        bottom = max(bottom, need_h - in_shape[2] - top)
        right = max(right, need_w - in_shape[3] - left)
    hp, wp = in_shape[2] + top + bottom, in_shape[3] + left + right
    if not (need_h <= hp < need_h + s[0] and need_w <= wp < need_w + s[1]):
        return Rule("dense", reason=f"{what} output size does not match its padding")
    return Rule("window", Window(fn, k, s, d, (top, bottom, left, right), value, macs))


def module_rule(m: nn.Module, in_shape: torch.Size | None, out_shape: torch.Size | None,
                 probe: Callable[[], tuple[int, int, int, int] | None]) -> Rule:
    """The rule for a call to module ``m`` whose (first) input and output have these shapes."""
    name = type(m).__name__
    spatial = in_shape is not None and out_shape is not None and len(in_shape) == 4 \
        and len(out_shape) == 4
    if isinstance(m, nn.BatchNorm2d) and (m.training or m.running_mean is None):
        return Rule("dense", reason="BatchNorm2d in training mode uses batch statistics")
    known = POINTWISE_MODULES + GLOBAL_MODULES + (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
    base = next((cls for cls in known if isinstance(m, cls)), None)
    if base is not None and type(m).forward is not base.forward:
        return Rule("dense", reason=f"{name} overrides {base.__name__}.forward")
    if isinstance(m, POINTWISE_MODULES):
        return Rule("pointwise") if spatial and in_shape == out_shape else \
            Rule("dense", reason=f"{name} on a non-image tensor")
    if isinstance(m, GLOBAL_MODULES) and not isinstance(m, (nn.AdaptiveAvgPool2d,
                                                             nn.AdaptiveMaxPool2d)):
        return Rule("dense", reason=f"global layer {name}")
    if not spatial:
        return Rule("dense", reason=f"{name} on a non-image tensor")
    if isinstance(m, nn.Conv2d):
        return conv_rule(m, in_shape, out_shape)
    if isinstance(m, nn.MaxPool2d):
        if m.return_indices:
            return Rule("dense", reason="MaxPool2d with return_indices")
        k, s, d = pair(m.kernel_size), pair(m.stride or m.kernel_size), pair(m.dilation)
        p = pair(m.padding)

        def maxpool(win: torch.Tensor) -> torch.Tensor:
            return F.max_pool2d(win, k, s, 0, d)
        return window_rule(maxpool, k, s, d, (p[0], p[0], p[1], p[1]), -math.inf, 0, in_shape,
                            out_shape, name, extend=m.ceil_mode)
    if isinstance(m, nn.AvgPool2d):
        k, s, p = pair(m.kernel_size), pair(m.stride or m.kernel_size), pair(m.padding)
        if m.divisor_override is not None or (not m.count_include_pad and p != (0, 0)):
            return Rule("dense", reason="AvgPool2d with a position-dependent divisor")

        def avgpool(win: torch.Tensor) -> torch.Tensor:
            return F.avg_pool2d(win, k, s, 0)
        # ceil mode is fine as long as it adds no window beyond the padding (checked there)
        return window_rule(avgpool, k, s, (1, 1), (p[0], p[0], p[1], p[1]), 0.0, 0, in_shape,
                            out_shape, name)
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        hin, win_, hout, wout = in_shape[2], in_shape[3], out_shape[2], out_shape[3]
        if hin % hout or win_ % wout:
            return Rule("dense", reason=f"global layer {name} (output size does not divide input)")
        k = (hin // hout, win_ // wout)
        pool = F.avg_pool2d if isinstance(m, nn.AdaptiveAvgPool2d) else F.max_pool2d

        def adaptive(win: torch.Tensor) -> torch.Tensor:
            return pool(win, k, k)
        return Rule("window", Window(adaptive, k, k, (1, 1), (0, 0, 0, 0), 0.0, 0))
    if next(m.parameters(), None) is None and next(m.buffers(), None) is None:
        pads = probe()
        if pads is not None:
            return Rule("pad", pads=pads)
    return Rule("dense", reason=f"unsupported layer {name}")


def module_macs(m: nn.Module, out_shape: torch.Size | None) -> int:
    """Multiply-adds of one full call of a conv or linear module (0 for other modules)."""
    if out_shape is None:
        return 0
    if isinstance(m, nn.Linear):
        return int(math.prod(out_shape[1:])) * m.in_features
    if isinstance(m, nn.Conv2d) and len(out_shape) == 4:
        k = pair(m.kernel_size)
        return (m.out_channels * (m.in_channels // m.groups) * k[0] * k[1]
                * out_shape[2] * out_shape[3])
    return 0


# Positions per pass are capped so that the largest recomputed box of a pass stays about this
# size: element-wise passes over larger batches run from main memory (measured: EfficientNet-Lite0
# ran 20-30% faster at 16 positions a pass than at 64; ResNet-18 the same from 16 to 64).
CHUNK_BYTES = 4 << 20
# Convolutions with fewer multiply-adds per output value (depthwise ones) are memory-bound: the
# extra passes of the low-precision change path cost more than the faster arithmetic saves.
LOW_PRECISION_MIN_MACS = 128
MAX_PROBED_PAD = 32  # larger size changes are not padding (an upsampler, say): skip the search


def probe_pad(m: nn.Module, shape: torch.Size) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) if ``m`` zero-pads inputs of this shape, else None.

    Two random inputs must both reappear unchanged inside the output at the same offset with
    zeros all around (this recognises size-dependent "same" padding modules as well as
    ``nn.ZeroPad2d``).
    """
    gen = torch.Generator().manual_seed(0)
    probes = [torch.rand(shape, generator=gen) + 1.0 for _ in range(2)]
    outs = [m(p) for p in probes]
    out = outs[0]
    if out.dim() != 4 or out.shape[:2] != shape[:2]:
        return None
    dh, dw = out.shape[2] - shape[2], out.shape[3] - shape[3]
    if not (0 <= dh <= MAX_PROBED_PAD and 0 <= dw <= MAX_PROBED_PAD):
        return None
    for top in range(dh + 1):
        for left in range(dw + 1):
            ok = True
            for p, o in zip(probes, outs):
                inner = o[:, :, top:top + shape[2], left:left + shape[3]]
                border = o.clone()
                border[:, :, top:top + shape[2], left:left + shape[3]] = 0
                if not (torch.equal(inner, p) and not border.any()):
                    ok = False
                    break
            if ok:
                return top, dh - top, left, dw - left
    return None


def tensors(values: Sequence[Any]) -> list[torch.Tensor]:
    return [v for v in values if isinstance(v, torch.Tensor)]
