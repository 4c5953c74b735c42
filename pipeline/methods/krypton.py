"""Incremental (exact) and approximate occlusion, after Krypton (Nakandala, Kumar,
Papakonstantinou, "Incremental and Approximate Inference for Faster Occlusion-based Deep CNN
Explanations", SIGMOD 2019).

An occlusion patch changes only a small box of the input, and each local layer (convolution,
pooling, element-wise op) changes only the box that its kernel can reach from the changed box of its
input. The engine runs the full image once and keeps every layer's output; for a batch of patch
positions it then recomputes each layer only over the changed box of every position: it gathers the
box plus its kernel's context from the cached (padded) input, overlays the position's changed
values, runs the layer on the stacked windows and keeps the output box as the position's patch.
A residual add or a channel concatenation merges its operands' boxes into their union. Layers that
need the whole tensor (flatten, linear, adaptive pooling to a size that does not divide the input,
anything unknown) receive full tensors rebuilt from the cache plus the patch, and everything after
them runs normally on the batch; an unknown layer is logged, and the result stays exact.

Boxes are tracked per position; the recomputed box of a batch has one common size (the largest
changed box, shifted inside the tensor at the edges), so every layer is one batched call.

Approximations (``ApproximateEngine``): Krypton's projective-field threshold ``tau`` caps the
changed box at ``ceil(tau * size)`` per axis (centred; values outside are taken from the cache), and
adaptive drill-down evaluates a coarse grid (every ``coarse_factor``-th position), interpolates it,
and evaluates exactly only the ``top_r`` fraction of positions with the largest interpolated
score drop.
"""

from __future__ import annotations

import copy
import logging
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

from pipeline.errors import PipelineError
from pipeline.methods.occlusion import PlainEngine, occlusion_boxes

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


class _LeafTracer(fx.Tracer):
    """Keeps every module without children (and torch.nn's own modules) as one graph node, so that
    size-dependent padding modules stay opaque and are recognised by probing."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return next(m.children(), None) is None or super().is_leaf_module(m, module_qualified_name)


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
        self.h, self.cy = _common(self.y0, self.y1, self.height)
        self.w, self.cx = _common(self.x0, self.x1, self.width)

    def area(self) -> torch.Tensor:
        """Exact changed area of each position (b,)."""
        return (self.y1 - self.y0) * (self.x1 - self.x0)

    def same_box(self, other: Region) -> bool:
        """True when both recompute the same box for every position."""
        return (self.h == other.h and self.w == other.w and torch.equal(self.cy, other.cy)
                and torch.equal(self.cx, other.cx))


def _common(lo: torch.Tensor, hi: torch.Tensor, size: int) -> tuple[int, torch.Tensor]:
    """Common box length (at least 1) and per-position starts, shifted inside [0, size)."""
    length = min(size, max(1, int((hi - lo).max())))
    return length, torch.minimum(lo, torch.full_like(lo, size - length)).clamp(min=0)


def _div_ceil(a: torch.Tensor, b: int) -> torch.Tensor:
    return -torch.div(-a, b, rounding_mode="floor")


def _cap(lo: torch.Tensor, hi: torch.Tensor, size: int, tau: float | None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Krypton's projective-field threshold: boxes longer than ceil(tau * size) are cut, centred."""
    if tau is None:
        return lo, hi
    limit = max(1, math.ceil(tau * size))
    excess = (hi - lo - limit).clamp(min=0)
    lo = lo + excess // 2
    return lo, torch.minimum(hi, lo + limit)


def _window_axis(lo: torch.Tensor, hi: torch.Tensor, pad: int, kernel: int, stride: int,
                 dilation: int, out_size: int, tau: float | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Output range of a sliding-window op that reads input rows [lo, hi) (unpadded)."""
    reach = dilation * (kernel - 1)
    out_lo = _div_ceil(lo + pad - reach, stride).clamp(0, out_size)
    out_hi = (torch.div(hi - 1 + pad, stride, rounding_mode="floor") + 1).clamp(0, out_size)
    out_hi = torch.where(hi > lo, torch.maximum(out_hi, out_lo), out_lo)
    return _cap(out_lo, out_hi, out_size, tau)


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


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(1, C, H, W) -> (H * W, C) rows of channels, the layout the window gathers read."""
    return t[0].permute(1, 2, 0).reshape(-1, t.shape[1]).contiguous()


def _gather(base: torch.Tensor, base_width: int, ry: torch.Tensor, rx: torch.Tensor,
            rh: int, rw: int, patch: Patch | None = None, offset: tuple[int, int] = (0, 0)
            ) -> torch.Tensor:
    """Windows (b, C, rh, rw) at (ry, rx) of a cached map (flattened by ``_flat``), with a patch's
    values overlaid where its box falls inside; ``offset`` is the patch box's shift into the
    cached map's coordinates (the padding). Returned in channels-last memory."""
    if patch is not None and patch.region.h == rh and patch.region.w == rw \
            and torch.equal(patch.region.cy + offset[0], ry) \
            and torch.equal(patch.region.cx + offset[1], rx):
        return patch.values  # the window is exactly the patch box (1x1 convs)
    rows = ry[:, None] + torch.arange(rh)
    cols = rx[:, None] + torch.arange(rw)
    index = rows[:, :, None] * base_width + cols[:, None, :]
    b, channels = len(ry), base.shape[1]
    out = base[index.reshape(-1)]
    if patch is not None:
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
            out[inside] = pvals[source[inside]]
    return out.view(b, rh, rw, channels).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------
# Layer rules


@dataclass
class _Window:
    """A sliding-window op run with padding 0 on a pre-padded input: conv, pooling."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, bottom, left, right
    pad_value: float
    macs_per_pixel: int  # multiply-adds per output pixel (0 for pooling)
    whole: Callable[[torch.Tensor], torch.Tensor] | None = None  # the op on an unpadded full map


@dataclass
class _Rule:
    """How one graph node is evaluated: kind is input, const, window, pointwise, alias (passes its
    input through: a BatchNorm folded into its conv), merge, cat, pad, dense or output."""

    kind: str
    window: _Window | None = None
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    reason: str = ""
    dense_macs: int = 0  # multiply-adds of the node computed in full for one image
    inplace: nn.Module | None = None  # in-place activation copy, may overwrite its input patch


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_rule(m: nn.Conv2d, in_shape: torch.Size, out_shape: torch.Size) -> _Rule:
    k, s, d = _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation)
    if m.padding_mode != "zeros":
        return _Rule("dense", reason=f"Conv2d with padding_mode={m.padding_mode!r}")
    if isinstance(m.padding, str):
        pads = [0, 0, 0, 0]
        if m.padding == "same":
            for axis in range(2):
                total = d[axis] * (k[axis] - 1)
                pads[2 * axis], pads[2 * axis + 1] = total // 2, total - total // 2
        top, bottom, left, right = pads
    else:
        (top, left) = _pair(m.padding)
        bottom, right = top, left

    def run(win: torch.Tensor) -> torch.Tensor:
        return F.conv2d(win, m.weight, m.bias, s, 0, d, m.groups)

    macs = m.out_channels * (m.in_channels // m.groups) * k[0] * k[1]
    return _window_rule(run, k, s, d, (top, bottom, left, right), 0.0, macs, in_shape, out_shape,
                        "Conv2d")


def _window_rule(fn: Callable[[torch.Tensor], torch.Tensor], k: tuple[int, int],
                 s: tuple[int, int], d: tuple[int, int], pads: tuple[int, int, int, int],
                 value: float, macs: int, in_shape: torch.Size, out_shape: torch.Size,
                 what: str, extend: bool = False) -> _Rule:
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
        return _Rule("dense", reason=f"{what} output size does not match its padding")
    return _Rule("window", _Window(fn, k, s, d, (top, bottom, left, right), value, macs))


def _module_rule(m: nn.Module, in_shape: torch.Size | None, out_shape: torch.Size | None,
                 probe: Callable[[], tuple[int, int, int, int] | None]) -> _Rule:
    """The rule for a call to module ``m`` whose (first) input and output have these shapes."""
    name = type(m).__name__
    spatial = in_shape is not None and out_shape is not None and len(in_shape) == 4 \
        and len(out_shape) == 4
    if isinstance(m, nn.BatchNorm2d) and (m.training or m.running_mean is None):
        return _Rule("dense", reason="BatchNorm2d in training mode uses batch statistics")
    known = POINTWISE_MODULES + GLOBAL_MODULES + (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
    base = next((cls for cls in known if isinstance(m, cls)), None)
    if base is not None and type(m).forward is not base.forward:
        return _Rule("dense", reason=f"{name} overrides {base.__name__}.forward")
    if isinstance(m, POINTWISE_MODULES):
        return _Rule("pointwise") if spatial and in_shape == out_shape else \
            _Rule("dense", reason=f"{name} on a non-image tensor")
    if isinstance(m, GLOBAL_MODULES) and not isinstance(m, (nn.AdaptiveAvgPool2d,
                                                             nn.AdaptiveMaxPool2d)):
        return _Rule("dense", reason=f"global layer {name}")
    if not spatial:
        return _Rule("dense", reason=f"{name} on a non-image tensor")
    if isinstance(m, nn.Conv2d):
        return _conv_rule(m, in_shape, out_shape)
    if isinstance(m, nn.MaxPool2d):
        if m.return_indices:
            return _Rule("dense", reason="MaxPool2d with return_indices")
        k, s, d = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.dilation)
        p = _pair(m.padding)

        def maxpool(win: torch.Tensor) -> torch.Tensor:
            return F.max_pool2d(win, k, s, 0, d)
        return _window_rule(maxpool, k, s, d, (p[0], p[0], p[1], p[1]), -math.inf, 0, in_shape,
                            out_shape, name, extend=m.ceil_mode)
    if isinstance(m, nn.AvgPool2d):
        k, s, p = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding)
        if m.divisor_override is not None or (not m.count_include_pad and p != (0, 0)):
            return _Rule("dense", reason="AvgPool2d with a position-dependent divisor")

        def avgpool(win: torch.Tensor) -> torch.Tensor:
            return F.avg_pool2d(win, k, s, 0)
        # ceil mode is fine as long as it adds no window beyond the padding (checked there)
        return _window_rule(avgpool, k, s, (1, 1), (p[0], p[0], p[1], p[1]), 0.0, 0, in_shape,
                            out_shape, name)
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        hin, win_, hout, wout = in_shape[2], in_shape[3], out_shape[2], out_shape[3]
        if hin % hout or win_ % wout:
            return _Rule("dense", reason=f"global layer {name} (output size does not divide input)")
        k = (hin // hout, win_ // wout)
        pool = F.avg_pool2d if isinstance(m, nn.AdaptiveAvgPool2d) else F.max_pool2d

        def adaptive(win: torch.Tensor) -> torch.Tensor:
            return pool(win, k, k)
        return _Rule("window", _Window(adaptive, k, k, (1, 1), (0, 0, 0, 0), 0.0, 0))
    if next(m.parameters(), None) is None and next(m.buffers(), None) is None:
        pads = probe()
        if pads is not None:
            return _Rule("pad", pads=pads)
    return _Rule("dense", reason=f"unsupported layer {name}")


def _module_macs(m: nn.Module, out_shape: torch.Size | None) -> int:
    """Multiply-adds of one full call of a conv or linear module (0 for other modules)."""
    if out_shape is None:
        return 0
    if isinstance(m, nn.Linear):
        return int(math.prod(out_shape[1:])) * m.in_features
    if isinstance(m, nn.Conv2d) and len(out_shape) == 4:
        k = _pair(m.kernel_size)
        return (m.out_channels * (m.in_channels // m.groups) * k[0] * k[1]
                * out_shape[2] * out_shape[3])
    return 0


MAX_PROBED_PAD = 32  # larger size changes are not padding (an upsampler, say): skip the search


def _probe_pad(m: nn.Module, shape: torch.Size) -> tuple[int, int, int, int] | None:
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


def _tensors(values: Sequence[Any]) -> list[torch.Tensor]:
    return [v for v in values if isinstance(v, torch.Tensor)]


# ----------------------------------------------------------------------------------------------
# Engine


class IncrementalEngine:
    """Exact incremental occlusion for one image: ``engine(boxes, fill) -> logits``.

    Construction traces ``model`` with torch.fx, runs ``x`` (1, C, H, W) once and keeps every
    node's output. If the model cannot be traced, or the traced graph does not reproduce the
    model's output, the engine logs why and runs plain occlusion instead (still exact). ``tau``
    enables Krypton's projective-field threshold (approximate).
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, tau: float | None = None) -> None:
        if tau is not None and not 0 < tau <= 1:
            raise PipelineError(f"Krypton tau must be in (0, 1], got {tau}. Fix: use e.g. tau=0.5, "
                                "or None for exact occlusion.")
        if x.dim() != 4 or x.shape[0] != 1:
            raise PipelineError(f"Krypton takes one image shaped (1, C, H, W), got "
                                f"{tuple(x.shape)}. Fix: pass x[i:i+1] for a batch.")
        self.model = model
        self.x = x
        self.tau = tau
        self.graph: fx.GraphModule | None = None
        self.cache: dict[fx.Node, Any] = {}
        self.rules: dict[fx.Node, _Rule] = {}
        self._flats: dict[tuple[fx.Node, tuple[int, int, int, int], float], torch.Tensor] = {}
        self._plain = PlainEngine(model, x)
        self._modules: dict[str, nn.Module] = {}
        self._fill_key: tuple[int, int, int] | None = None
        self._fill_flat = torch.empty(0)
        with torch.no_grad():
            self._build()

    # -- construction --------------------------------------------------------------------------

    def _build(self) -> None:
        try:
            graph = fx.GraphModule(self.model, _LeafTracer().trace(self.model))
        except Exception as exc:  # fx raises many error types for untraceable Python
            logger.info("Krypton: cannot trace %s with torch.fx (%s: %s); using plain occlusion.",
                        type(self.model).__name__, type(exc).__name__, exc)
            return
        modules = dict(graph.named_modules())
        dependent: set[fx.Node] = set()
        for node in graph.graph.nodes:
            args = fx.node.map_arg((node.args, node.kwargs), lambda n: self.cache[n])
            if node.op == "placeholder":
                if dependent:
                    logger.info("Krypton: model takes several inputs; using plain occlusion.")
                    return
                value = self.x
            elif node.op == "output":
                value = args[0][0]
            else:
                value = _call(node, modules, *_unalias(node, modules, args))
            self.cache[node] = value
            if node.op == "placeholder" or any(a in dependent for a in node.all_input_nodes):
                dependent.add(node)
                self.rules[node] = self._rule(node, modules, args)
            else:
                self.rules[node] = _Rule("const")
        output = next(n for n in graph.graph.nodes if n.op == "output")
        reference = self.model(self.x)
        traced = self.cache[output]
        if not (isinstance(traced, torch.Tensor) and traced.shape == reference.shape
                and torch.allclose(traced, reference, rtol=1e-4, atol=1e-5)):
            logger.info("Krypton: the traced graph of %s does not reproduce its output (in-place "
                        "aliasing or data-dependent code?); using plain occlusion.",
                        type(self.model).__name__)
            return
        self.graph = graph
        self._modules = modules
        self._fold_batchnorm(modules)
        self._activations_in_place(modules)
        self._log_fallbacks()

    def _activations_in_place(self, modules: dict[str, nn.Module]) -> None:
        """Let an activation module overwrite its input patch when that patch is a fresh conv or
        pooling output (possibly through a folded BatchNorm) that nothing else reads."""
        for node, rule in self.rules.items():
            module = modules.get(node.target) if node.op == "call_module" else None
            if rule.kind != "pointwise" or not hasattr(module, "inplace"):
                continue
            source = node.args[0]
            if self.rules[source].kind == "alias" and len(source.users) == 1:
                source = source.args[0]
            if self.rules[source].kind == "window" and len(source.users) == 1:
                rule.inplace = copy.copy(module)
                rule.inplace.inplace = True

    def _fold_batchnorm(self, modules: dict[str, nn.Module]) -> None:
        """Fold each eval-mode BatchNorm into the convolution before it (when the conv feeds only
        the BatchNorm): one pass over the patch instead of two. The BatchNorm node then passes its
        input through (kind "alias")."""
        for node, rule in self.rules.items():
            if not (rule.kind == "pointwise" and node.op == "call_module"
                    and isinstance(modules[node.target], nn.BatchNorm2d)):
                continue
            source = node.args[0]
            conv = modules.get(source.target) if source.op == "call_module" else None
            if not (isinstance(conv, nn.Conv2d) and self.rules[source].kind == "window"
                    and len(source.users) == 1):
                continue
            bn = modules[node.target]
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else \
                1.0 / torch.sqrt(bn.running_var + bn.eps)
            shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * scale
            weight = conv.weight * scale.view(-1, 1, 1, 1)
            bias = shift if conv.bias is None else conv.bias * scale + shift
            spec = self.rules[source].window
            stride, dilation, groups = spec.stride, spec.dilation, conv.groups

            def fused(win: torch.Tensor, w: torch.Tensor = weight, b: torch.Tensor = bias,
                      s: tuple[int, int] = stride, d: tuple[int, int] = dilation,
                      g: int = groups) -> torch.Tensor:
                return F.conv2d(win, w, b, s, 0, d, g)

            def whole(t: torch.Tensor, w: torch.Tensor = weight, b: torch.Tensor = bias,
                      m: nn.Conv2d = conv) -> torch.Tensor:
                return F.conv2d(t, w, b, m.stride, m.padding, m.dilation, m.groups)

            spec.fn, spec.whole = fused, whole
            self.rules[node] = _Rule("alias", dense_macs=rule.dense_macs)

    def _log_fallbacks(self) -> None:
        """Log each node where incremental evaluation stops (not the dense nodes after it):
        DEBUG for global layers, which need the whole tensor anyway, INFO for unsupported ones."""
        dense: set[fx.Node] = set()
        for node, rule in self.rules.items():
            inputs = [n for n in node.all_input_nodes if self.rules[n].kind != "const"]
            if inputs and all(n in dense for n in inputs):
                dense.add(node)
            elif rule.kind == "dense":
                dense.add(node)
                level = logging.DEBUG if rule.reason.startswith("global") else logging.INFO
                logger.log(level, "Krypton: node %s (%s): %s; computing the full tensor from "
                           "here on.", node.name, node.target, rule.reason)

    def _rule(self, node: fx.Node, modules: dict[str, nn.Module], args: tuple) -> _Rule:
        """Decide how an input-dependent node is computed incrementally."""
        pos_args, kwargs = args
        out = self.cache[node]
        out_shape = out.shape if isinstance(out, torch.Tensor) else None
        first = pos_args[0] if pos_args else None
        in_shape = first.shape if isinstance(first, torch.Tensor) else None
        is_image = out_shape is not None and len(out_shape) == 4
        if node.op == "placeholder":
            return _Rule("input")
        if node.op == "output":
            return _Rule("output")
        if node.op == "call_module":
            m = modules[node.target]
            if len(pos_args) != 1 or kwargs:
                return _Rule("dense", reason=f"{type(m).__name__} called with several arguments")
            rule = _module_rule(m, in_shape, out_shape, lambda: _probe_pad(m, in_shape))
            rule.dense_macs = _module_macs(m, out_shape)
            if rule.window is not None:
                rule.window.whole = m
            return rule
        target = node.target
        if node.op == "call_method":
            if target in POINTWISE_METHODS and is_image and in_shape == out_shape \
                    and not _tensors(pos_args[1:]) and not _tensors(list(kwargs.values())):
                return _Rule("pointwise")
            if target in MERGE_METHODS and self._mergeable(node, pos_args, kwargs, out_shape):
                return _Rule("merge")
            return self._dense_rule(node, target in GLOBAL_METHODS, f"method .{target}()")
        if node.op == "call_function":
            if target in POINTWISE_FUNCTIONS and is_image and in_shape == out_shape \
                    and not _tensors(pos_args[1:]) and not _tensors(list(kwargs.values())):
                return _Rule("pointwise")
            if target in MERGE_FUNCTIONS and self._mergeable(node, pos_args, kwargs, out_shape):
                return _Rule("merge")
            if target in CAT_FUNCTIONS and is_image:
                dim = kwargs.get("dim", pos_args[1] if len(pos_args) > 1 else 0)
                parts = pos_args[0]
                if dim in (1, -3) and all(isinstance(p, torch.Tensor) and p.dim() == 4
                                          and p.shape[2:] == out_shape[2:] for p in parts):
                    return _Rule("cat")
            if target is F.pad and is_image and in_shape is not None and len(in_shape) == 4:
                pad = pos_args[1] if len(pos_args) > 1 else kwargs.get("pad")
                mode = kwargs.get("mode", pos_args[2] if len(pos_args) > 2 else "constant")
                value = kwargs.get("value", pos_args[3] if len(pos_args) > 3 else None)
                if mode == "constant" and not value and len(pad) == 4 and min(pad) >= 0:
                    left, right, top, bottom = (int(p) for p in pad)
                    return _Rule("pad", pads=(top, bottom, left, right))
            name = getattr(target, "__name__", str(target))
            return self._dense_rule(node, target in GLOBAL_FUNCTIONS, f"function {name}")
        return _Rule("dense", reason=f"{node.op} node")

    def _dense_rule(self, node: fx.Node, is_global: bool, what: str) -> _Rule:
        return _Rule("dense", reason=("global " if is_global else "unsupported ") + what)

    def _mergeable(self, node: fx.Node, pos_args: tuple, kwargs: dict,
                   out_shape: torch.Size | None) -> bool:
        """An element-wise op whose input-dependent operands all have the output's shape and whose
        other tensors broadcast without spatial extent (or share it)."""
        if out_shape is None or len(out_shape) != 4 or out_shape[0] != 1:
            return False
        inputs = {id(self.cache[n]): n for n in node.all_input_nodes}
        for value in list(pos_args) + list(kwargs.values()):
            if not isinstance(value, torch.Tensor):
                continue
            source = inputs.get(id(value))
            dependent = source is not None and self.rules[source].kind != "const"
            if dependent and value.shape != out_shape:
                return False
            if not dependent and value.dim() == 4 and value.shape[2:] not in (out_shape[2:],
                                                                               (1, 1)):
                return False
        return True

    # -- batch evaluation ----------------------------------------------------------------------

    def _base(self, node: fx.Node, pads: tuple[int, int, int, int] = (0, 0, 0, 0),
              value: float = 0.0) -> tuple[torch.Tensor, int]:
        """The cached output of ``node``, padded and flattened for gathers (computed once)."""
        key = (node, pads, value)
        if key not in self._flats:
            top, bottom, left, right = pads
            t = self.cache[node]
            if any(pads):
                t = F.pad(t, (left, right, top, bottom), value=value)
            self._flats[key] = _flat(t)
        cached = self.cache[node]
        return self._flats[key], cached.shape[3] + pads[2] + pads[3]

    def _full(self, node: fx.Node, value: Any) -> Any:
        """A node's value in full for every position (patches are rebuilt from the cache)."""
        if isinstance(value, Patch):
            base, width = self._base(node)
            reg = value.region
            zeros = torch.zeros_like(reg.cy)
            return _gather(base, width, zeros, zeros, reg.height, reg.width, value)
        if isinstance(value, Dense):
            return value.value
        return value

    def _view(self, node: fx.Node, value: Any, region: Region) -> Any:
        """A node's values over ``region``'s recomputed boxes (constants pass through)."""
        if isinstance(value, Patch):
            if value.region.same_box(region):
                return value.values
            base, width = self._base(node)
            return _gather(base, width, region.cy, region.cx, region.h, region.w, value)
        if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[2:] == (
                region.height, region.width) and value.shape[2:] != (1, 1):
            base, width = self._base(node)
            return _gather(base, width, region.cy, region.cx, region.h, region.w)
        return value

    def _input_patch(self, boxes: torch.Tensor, fill: torch.Tensor) -> Patch:
        _, _, height, width = self.x.shape
        region = Region(boxes[:, 0], boxes[:, 2], boxes[:, 1], boxes[:, 3], height, width)
        zeros = (0, 0, 0, 0)
        placeholder = next(iter(self.cache))
        base, _ = self._base(placeholder, zeros)
        key = (id(fill), fill.data_ptr(), fill._version)
        if self._fill_key != key:
            self._fill_key, self._fill_flat = key, _flat(fill)
        image = _gather(base, width, region.cy, region.cx, region.h, region.w)
        filled = _gather(self._fill_flat, width, region.cy, region.cx, region.h, region.w)
        rows = region.cy[:, None] + torch.arange(region.h)
        cols = region.cx[:, None] + torch.arange(region.w)
        inside = ((rows >= region.y0[:, None]) & (rows < region.y1[:, None]))[:, None, :, None] \
            & ((cols >= region.x0[:, None]) & (cols < region.x1[:, None]))[:, None, None, :]
        return Patch(torch.where(inside, filled, image), region)

    @torch.no_grad()
    def __call__(self, boxes: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """Logits (b, K) of the image occluded by ``fill`` at ``boxes`` (b, 4): (y0, x0, y1, x1)
        rows of half-open pixel ranges."""
        if self.graph is None:
            return self._plain(boxes, fill)
        modules = self._modules
        env: dict[fx.Node, Any] = {}
        for node, rule in self.rules.items():
            if rule.kind == "const":
                env[node] = self.cache[node]
            elif rule.kind == "input":
                env[node] = self._input_patch(boxes.long(), fill)
            elif rule.kind == "output":
                return self._full(node.args[0], env[node.args[0]])
            else:
                env[node] = self._evaluate(node, rule, env, modules)
        raise RuntimeError("traced graph has no output node")

    def _evaluate(self, node: fx.Node, rule: _Rule, env: dict[fx.Node, Any],
                  modules: dict[str, nn.Module]) -> Any:
        patches = [n for n in node.all_input_nodes if isinstance(env[n], Patch)]
        dense_in = any(isinstance(env[n], Dense) for n in node.all_input_nodes)
        if rule.kind == "alias":
            return env[node.args[0]]
        if rule.kind == "window" and (dense_in or not patches) and rule.window.whole is not None:
            return Dense(rule.window.whole(self._full(node.args[0], env[node.args[0]])))
        if rule.kind == "dense" or dense_in or not patches:
            args = fx.node.map_arg((node.args, node.kwargs), lambda n: self._full(n, env[n]))
            return Dense(_call(node, modules, *_unalias(node, modules, args)))
        if rule.inplace is not None:
            patch = env[patches[0]]
            return Patch(rule.inplace(patch.values), patch.region)
        if rule.kind == "pointwise":
            src = patches[0]
            args = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n].values
                                   if n is src else env[n])
            return Patch(_call(node, modules, *_unalias(node, modules, args)), env[src].region)
        if rule.kind == "pad":
            top, _, left, _ = rule.pads
            reg = env[patches[0]].region
            shape = self.cache[node].shape
            region = Region(reg.y0 + top, reg.y1 + top, reg.x0 + left, reg.x1 + left,
                            shape[2], shape[3])
            region.cy, region.cx, region.h, region.w = reg.cy + top, reg.cx + left, reg.h, reg.w
            return Patch(env[patches[0]].values, region)
        if rule.kind == "window":
            return self._window(node, rule.window, env[patches[0]], patches[0])
        # merge / cat: union of the operands' boxes
        region = self._union([env[n].region for n in patches], self.cache[node].shape)
        args = fx.node.map_arg((node.args, node.kwargs),
                               lambda n: self._view(n, env[n], region))
        return Patch(_call(node, modules, *args), region)

    def _union(self, regions: list[Region], shape: torch.Size) -> Region:
        y0 = torch.stack([r.y0 for r in regions]).amin(0)
        y1 = torch.stack([r.y1 for r in regions]).amax(0)
        x0 = torch.stack([r.x0 for r in regions]).amin(0)
        x1 = torch.stack([r.x1 for r in regions]).amax(0)
        y0, y1 = _cap(y0, y1, shape[2], self.tau)
        x0, x1 = _cap(x0, x1, shape[3], self.tau)
        return Region(y0, y1, x0, x1, shape[2], shape[3])

    def _out_region(self, spec: _Window, reg: Region, shape: torch.Size) -> Region:
        top, _, left, _ = spec.pads
        y0, y1 = _window_axis(reg.y0, reg.y1, top, spec.kernel[0], spec.stride[0],
                              spec.dilation[0], shape[2], self.tau)
        x0, x1 = _window_axis(reg.x0, reg.x1, left, spec.kernel[1], spec.stride[1],
                              spec.dilation[1], shape[3], self.tau)
        return Region(y0, y1, x0, x1, shape[2], shape[3])

    def _window(self, node: fx.Node, spec: _Window, patch: Patch, source: fx.Node) -> Patch:
        shape = self.cache[node].shape
        out = self._out_region(spec, patch.region, shape)
        reg = patch.region
        if spec.whole is not None and reg.h == reg.height and reg.w == reg.width:
            # the patch already spans the whole map: run the layer itself, no gather
            out.cy, out.cx = torch.zeros_like(out.cy), torch.zeros_like(out.cx)
            out.h, out.w = shape[2], shape[3]
            return Patch(spec.whole(patch.values), out)
        base, width = self._base(source, spec.pads, spec.pad_value)
        rh = (out.h - 1) * spec.stride[0] + spec.dilation[0] * (spec.kernel[0] - 1) + 1
        rw = (out.w - 1) * spec.stride[1] + spec.dilation[1] * (spec.kernel[1] - 1) + 1
        win = _gather(base, width, out.cy * spec.stride[0], out.cx * spec.stride[1], rh, rw,
                      patch, (spec.pads[0], spec.pads[2]))
        return Patch(spec.fn(win), out)

    # -- cost model ----------------------------------------------------------------------------

    def flop_ratio(self, boxes: torch.Tensor) -> float:
        """Krypton's theoretical speed-up: full-network multiply-adds of conv and linear layers
        over the mean, across ``boxes``, of the multiply-adds needed to recompute only each
        position's changed boxes (layers after a global one count in full)."""
        if self.graph is None:
            return 1.0
        full = 0
        incremental = torch.zeros(len(boxes), dtype=torch.float64)
        regions: dict[fx.Node, Region | None] = {}
        _, _, height, width = self.x.shape
        for node, rule in self.rules.items():
            out = self.cache[node]
            full_macs = rule.dense_macs
            full += full_macs
            if rule.kind == "const":
                continue
            ins = [regions.get(n) for n in node.all_input_nodes if n in regions]
            if rule.kind == "input":
                regions[node] = Region(boxes[:, 0], boxes[:, 2], boxes[:, 1], boxes[:, 3],
                                       height, width)
            elif rule.kind in ("dense", "output") or any(r is None for r in ins) or not ins:
                regions[node] = None
                incremental += full_macs
            elif rule.kind == "window":
                regions[node] = self._out_region(rule.window, ins[0], out.shape)
                incremental += rule.window.macs_per_pixel * regions[node].area().double()
            elif rule.kind == "pad":
                top, _, left, _ = rule.pads
                r = ins[0]
                regions[node] = Region(r.y0 + top, r.y1 + top, r.x0 + left, r.x1 + left,
                                       out.shape[2], out.shape[3])
            elif rule.kind in ("pointwise", "alias"):
                regions[node] = ins[0]
            else:
                regions[node] = self._union(ins, out.shape)
        return float(full / incremental.mean()) if full else 1.0


def _call(node: fx.Node, modules: dict[str, nn.Module], args: tuple, kwargs: dict) -> Any:
    """Run one graph node on concrete arguments."""
    if node.op == "call_module":
        return modules[node.target](*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "get_attr":
        value: Any = modules[""]
        for part in node.target.split("."):
            value = getattr(value, part)
        return value
    raise RuntimeError(f"cannot run fx node {node.op}")


def _unalias(node: fx.Node, modules: dict[str, nn.Module], args: tuple) -> tuple[tuple, dict]:
    """Clone the first tensor argument of an in-place op so cached values stay intact."""
    pos_args, kwargs = args
    inplace = (node.op == "call_module" and getattr(modules[node.target], "inplace", False)) or \
        kwargs.get("inplace", False) is True or \
        (node.op == "call_method" and str(node.target).endswith("_"))
    if inplace and pos_args and isinstance(pos_args[0], torch.Tensor):
        pos_args = (pos_args[0].clone(), *pos_args[1:])
    return pos_args, kwargs


# ----------------------------------------------------------------------------------------------
# Approximate occlusion


def _coarse_index(n: int, factor: int) -> torch.Tensor:
    """Every ``factor``-th index of 0..n-1, always including the last one."""
    index = list(range(0, n, factor))
    if index[-1] != n - 1:
        index.append(n - 1)
    return torch.tensor(index, dtype=torch.long)


def _interp_axis(values: torch.Tensor, index: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Linear interpolation along ``dim`` from samples at ``index`` to all positions 0..n-1."""
    if len(index) == 1:
        return values.index_select(dim, torch.zeros(n, dtype=torch.long))
    fine = torch.arange(n)
    seg = (torch.searchsorted(index, fine, right=True) - 1).clamp(0, len(index) - 2)
    lo, hi = index[seg], index[seg + 1]
    t = ((fine - lo).double() / (hi - lo).double()).to(values.dtype)
    shape = [1] * values.dim()
    shape[dim] = n
    t = t.view(shape)
    return values.index_select(dim, seg) * (1 - t) + values.index_select(dim, seg + 1) * t


def drill_down(evaluate: Callable[[torch.Tensor], torch.Tensor], grid: tuple[int, int],
               target: int, coarse_factor: int = 2, top_r: float = 0.25
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Krypton's adaptive drill-down over a (gh, gw) grid of positions (row-major).

    ``evaluate(indices) -> logits (n, K)`` computes positions exactly. The coarse grid (every
    ``coarse_factor``-th row and column, plus the last) is evaluated and linearly interpolated;
    then the ``top_r`` fraction of all positions with the largest interpolated score drop (lowest
    target score) among the rest is evaluated too. Returns logits (P, K) and the evaluated indices.
    """
    gh, gw = grid
    rows, cols = _coarse_index(gh, coarse_factor), _coarse_index(gw, coarse_factor)
    coarse = (rows[:, None] * gw + cols[None, :]).reshape(-1)
    coarse_logits = evaluate(coarse)
    k = coarse_logits.shape[1]
    sampled = coarse_logits.reshape(len(rows), len(cols), k)
    logits = _interp_axis(_interp_axis(sampled, rows, gh, 0), cols, gw, 1).reshape(gh * gw, k)
    logits[coarse] = coarse_logits
    rest = torch.ones(gh * gw, dtype=torch.bool)
    rest[coarse] = False
    candidates = rest.nonzero().squeeze(1)
    count = min(len(candidates), round(top_r * gh * gw))
    order = torch.argsort(logits[candidates, target], stable=True)
    fine = candidates[order[:count]].sort().values
    if count:
        logits[fine] = evaluate(fine)
    return logits, torch.cat([coarse, fine]).sort().values


class ApproximateEngine(IncrementalEngine):
    """Krypton's approximate occlusion: projective-field threshold ``tau`` plus adaptive
    drill-down (``coarse_factor``, ``top_r``; see :func:`drill_down`).

    ``occlusion`` calls :meth:`grid_logits`; called directly with boxes it applies only ``tau``.
    After a run, ``evaluated`` holds the indices of the positions that were computed.
    """

    DEFAULTS = {"tau": 0.9, "coarse_factor": 2, "top_r": 0.3}

    def __init__(self, model: nn.Module, x: torch.Tensor, tau: float | None = 0.9,
                 coarse_factor: int = 2, top_r: float = 0.3) -> None:
        if coarse_factor < 1 or int(coarse_factor) != coarse_factor:
            raise PipelineError(f"Krypton coarse_factor must be a positive integer, got "
                                f"{coarse_factor}. Fix: use e.g. coarse_factor=2 (1 disables "
                                "drill-down).")
        if not 0 <= top_r <= 1:
            raise PipelineError(f"Krypton top_r must be in [0, 1], got {top_r}. Fix: use e.g. "
                                "top_r=0.25.")
        super().__init__(model, x, tau)
        self.coarse_factor = int(coarse_factor)
        self.top_r = float(top_r)
        self.evaluated = torch.zeros(0, dtype=torch.long)

    def grid_logits(self, boxes: torch.Tensor, grid: tuple[int, int], fill: torch.Tensor,
                    target: int, batch_size: int) -> torch.Tensor:
        """Logits (P, K) for every position of the grid, most of them interpolated."""
        def evaluate(index: torch.Tensor) -> torch.Tensor:
            chosen = boxes[index]
            return torch.cat([self(chosen[i:i + batch_size], fill)
                              for i in range(0, len(chosen), batch_size)])

        if self.coarse_factor == 1:
            self.evaluated = torch.arange(len(boxes))
            return evaluate(self.evaluated)
        logits, self.evaluated = drill_down(evaluate, grid, target, self.coarse_factor,
                                            self.top_r)
        return logits


def theoretical_flop_ratio(model: nn.Module, input_shape: tuple[int, int, int],
                           window: int | tuple[int, int], stride: int | tuple[int, int],
                           tau: float | None = None) -> float:
    """Krypton's theoretical speed-up of incremental occlusion for ``model`` on images of
    ``input_shape`` (C, H, W): full-network conv/linear multiply-adds over the mean incremental
    ones across all patch positions (with ``tau``, the thresholded changed boxes)."""
    x = torch.zeros(1, *input_shape)
    boxes, _ = occlusion_boxes(input_shape[1], input_shape[2], window, stride)
    return IncrementalEngine(model, x, tau).flop_ratio(boxes)
