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
changed box, shifted inside the tensor at the edges), so every layer is one batched call. Batches
are split so that the largest recomputed box of a pass stays cache-sized (``CHUNK_BYTES``). Given a
whole map (``grid_logits``), every position's box on every layer is worked out once (``precompute``, the box table) and
each batch indexes them.

Approximations (``ApproximateEngine``): Krypton's projective-field threshold ``tau`` caps the
changed box at ``ceil(tau * size)`` per axis on maps of at least ``TAU_MIN_SIZE`` (centred on the
patch; values outside are taken from the cache); adaptive drill-down evaluates a checkerboard of
positions, estimates the others from their neighbours and evaluates those whose neighbourhood
varies, by a threshold scaled by how well interpolation predicts the map; and the dense
convolutions process only the patch's change, in bfloat16.

This module holds the engine class alone (about 560 lines): its methods share the traced graph,
the cached activations and the box table of one image, and splitting the class would spread one
algorithm over files. Its parts live beside it: box arithmetic and patch values in ``regions``,
the per-layer rules in ``rules``, the approximations in ``approximate``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

from pipeline.errors import PipelineError
from pipeline.methods.occlusion.regions import (Dense, Patch, Region, cap_box, flat, gather, scatter,
                                                window_axis)
from pipeline.methods.occlusion.rules import (CAT_FUNCTIONS, CHUNK_BYTES, GLOBAL_FUNCTIONS, GLOBAL_METHODS,
                                              LOW_PRECISION_MIN_MACS, LeafTracer, MERGE_FUNCTIONS,
                                              MERGE_METHODS, POINTWISE_FUNCTIONS, POINTWISE_METHODS, Rule,
                                              Window, module_macs, module_rule, probe_pad, tensors)
from pipeline.methods.occlusion.engines import PlainEngine
from pipeline.methods.occlusion.patches import occlusion_boxes

logger = logging.getLogger(__name__)


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
        self.rules: dict[fx.Node, Rule] = {}
        self._flats: dict[tuple[fx.Node, tuple[int, int, int, int], float], torch.Tensor] = {}
        self._plain = PlainEngine(model, x)
        self._modules: dict[str, nn.Module] = {}
        self._fill_key: tuple[int, int, int] | None = None
        self._fill_flat = torch.empty(0)
        self._low: torch.dtype | None = None  # set by ApproximateEngine: convolve changes in it
        self._low_weights: dict[int, torch.Tensor] = {}
        self._output_of: dict[fx.Node, fx.Node] = {}  # conv -> the BatchNorm folded into it
        self._cl_cache: dict[fx.Node, torch.Tensor] = {}
        self._chunk: int | None = None  # positions per pass, set on the first call
        self._centre: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        # see ``precompute``: each node's changed boxes for every position in the table, the table's
        # sorted box codes, and the table rows of the batch being evaluated (None: compute boxes)
        self._table: dict[fx.Node, torch.Tensor] = {}  # (P, 4): y0, y1, x0, x1
        self._table_codes = torch.zeros(0, dtype=torch.long)
        self._table_order = torch.zeros(0, dtype=torch.long)
        self._rows: torch.Tensor | None = None
        with torch.no_grad():
            self._build()

    # -- construction --------------------------------------------------------------------------

    def _build(self) -> None:
        try:
            graph = fx.GraphModule(self.model, LeafTracer().trace(self.model))
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
                self.rules[node] = Rule("const")
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

            spec.fn, spec.whole, spec.weight = fused, whole, weight
            self._output_of[source] = node
            self.rules[node] = Rule("alias", dense_macs=rule.dense_macs)

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

    def _rule(self, node: fx.Node, modules: dict[str, nn.Module], args: tuple) -> Rule:
        """Decide how an input-dependent node is computed incrementally."""
        pos_args, kwargs = args
        out = self.cache[node]
        out_shape = out.shape if isinstance(out, torch.Tensor) else None
        first = pos_args[0] if pos_args else None
        in_shape = first.shape if isinstance(first, torch.Tensor) else None
        is_image = out_shape is not None and len(out_shape) == 4
        if node.op == "placeholder":
            return Rule("input")
        if node.op == "output":
            return Rule("output")
        if node.op == "call_module":
            m = modules[node.target]
            if len(pos_args) != 1 or kwargs:
                return Rule("dense", reason=f"{type(m).__name__} called with several arguments")
            rule = module_rule(m, in_shape, out_shape, lambda: probe_pad(m, in_shape))
            rule.dense_macs = module_macs(m, out_shape)
            if rule.window is not None:
                rule.window.whole = m
            return rule
        target = node.target
        if node.op == "call_method":
            if target in POINTWISE_METHODS and is_image and in_shape == out_shape \
                    and not tensors(pos_args[1:]) and not tensors(list(kwargs.values())):
                return Rule("pointwise")
            if target in MERGE_METHODS and self._mergeable(node, pos_args, kwargs, out_shape):
                return Rule("merge")
            return self._dense_rule(node, target in GLOBAL_METHODS, f"method .{target}()")
        if node.op == "call_function":
            if target in POINTWISE_FUNCTIONS and is_image and in_shape == out_shape \
                    and not tensors(pos_args[1:]) and not tensors(list(kwargs.values())):
                return Rule("pointwise")
            if target in MERGE_FUNCTIONS and self._mergeable(node, pos_args, kwargs, out_shape):
                return Rule("merge")
            if target in CAT_FUNCTIONS and is_image:
                dim = kwargs.get("dim", pos_args[1] if len(pos_args) > 1 else 0)
                parts = pos_args[0]
                if dim in (1, -3) and all(isinstance(p, torch.Tensor) and p.dim() == 4
                                          and p.shape[2:] == out_shape[2:] for p in parts):
                    return Rule("cat")
            if target is F.pad and is_image and in_shape is not None and len(in_shape) == 4:
                pad = pos_args[1] if len(pos_args) > 1 else kwargs.get("pad")
                mode = kwargs.get("mode", pos_args[2] if len(pos_args) > 2 else "constant")
                value = kwargs.get("value", pos_args[3] if len(pos_args) > 3 else None)
                if mode == "constant" and not value and len(pad) == 4 and min(pad) >= 0:
                    left, right, top, bottom = (int(p) for p in pad)
                    return Rule("pad", pads=(top, bottom, left, right))
            name = getattr(target, "__name__", str(target))
            return self._dense_rule(node, target in GLOBAL_FUNCTIONS, f"function {name}")
        return Rule("dense", reason=f"{node.op} node")

    def _dense_rule(self, node: fx.Node, is_global: bool, what: str) -> Rule:
        return Rule("dense", reason=("global " if is_global else "unsupported ") + what)

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
            self._flats[key] = flat(t)
        cached = self.cache[node]
        return self._flats[key], cached.shape[3] + pads[2] + pads[3]

    def _full(self, node: fx.Node, value: Any) -> Any:
        """A node's value in full for every position (patches are rebuilt from the cache)."""
        if isinstance(value, Patch):
            base, width = self._base(node)
            reg = value.region
            zeros = torch.zeros_like(reg.cy)
            return gather(base, width, zeros, zeros, reg.height, reg.width, value)
        if isinstance(value, Dense):
            return value.value
        return value

    def _view(self, node: fx.Node, value: Any, region: Region) -> Any:
        """A node's values over ``region``'s recomputed boxes (constants pass through)."""
        if isinstance(value, Patch):
            if value.region.same_box(region):
                return value.values
            base, width = self._base(node)
            return gather(base, width, region.cy, region.cx, region.h, region.w, value)
        if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[2:] == (
                region.height, region.width) and value.shape[2:] != (1, 1):
            base, width = self._base(node)
            return gather(base, width, region.cy, region.cx, region.h, region.w)
        return value

    def _input_patch(self, boxes: torch.Tensor, fill: torch.Tensor) -> Patch:
        _, _, height, width = self.x.shape
        region = Region(boxes[:, 0], boxes[:, 2], boxes[:, 1], boxes[:, 3], height, width)
        zeros = (0, 0, 0, 0)
        placeholder = next(iter(self.cache))
        base, _ = self._base(placeholder, zeros)
        key = (id(fill), fill.data_ptr(), fill._version)
        if self._fill_key != key:
            self._fill_key, self._fill_flat = key, flat(fill)
        image = gather(base, width, region.cy, region.cx, region.h, region.w)
        filled = gather(self._fill_flat, width, region.cy, region.cx, region.h, region.w)
        rows = region.cy[:, None] + torch.arange(region.h)
        cols = region.cx[:, None] + torch.arange(region.w)
        inside = ((rows >= region.y0[:, None]) & (rows < region.y1[:, None]))[:, None, :, None] \
            & ((cols >= region.x0[:, None]) & (cols < region.x1[:, None]))[:, None, None, :]
        return Patch(torch.where(inside, filled, image), region)

    def _codes(self, boxes: torch.Tensor) -> torch.Tensor:
        """One integer per box (y0, x0, y1, x1), for looking boxes up in the box table."""
        _, _, height, width = self.x.shape
        b = boxes.long()
        return ((b[:, 0] * (height + 1) + b[:, 2]) * (width + 1) + b[:, 1]) * (width + 1) + b[:, 3]

    @torch.no_grad()
    def precompute(self, boxes: torch.Tensor) -> None:
        """Work out every node's changed box for each of ``boxes`` (all the positions of a map)
        once: later calls with any of these boxes index them instead of redoing the box
        arithmetic, a few dozen small tensor ops per layer and batch. The boxes are the same
        either way (each position's box depends on that position only), so are the logits."""
        self._table = {}
        if self.graph is None or len(boxes) == 0:
            return
        for node, rule, region in self._regions(boxes.long()):
            if region is not None and rule.kind in ("window", "merge", "cat"):
                self._table[node] = torch.stack([region.y0, region.y1, region.x0, region.x1], 1)
        self._table_codes, self._table_order = self._codes(boxes).sort()

    def precomputed(self, boxes: torch.Tensor) -> bool:
        """Whether every one of ``boxes`` is in the box table (its boxes are looked up, not worked out)."""
        return self._table_rows(boxes) is not None

    def _table_rows(self, boxes: torch.Tensor) -> torch.Tensor | None:
        """Rows of the box table holding ``boxes``, or None when some box is not in it."""
        if not self._table:
            return None
        codes = self._codes(boxes)
        at = torch.searchsorted(self._table_codes, codes).clamp(max=len(self._table_codes) - 1)
        if not torch.equal(self._table_codes[at], codes):
            return None
        return self._table_order[at]

    def _from_table(self, node: fx.Node, shape: torch.Size) -> Region | None:
        """``node``'s changed boxes from the table for the batch being evaluated (None: not in it)."""
        if self._rows is None or node not in self._table:
            return None
        y0, y1, x0, x1 = self._table[node][self._rows].unbind(1)
        return Region(y0, y1, x0, x1, shape[2], shape[3])

    def grid_logits(self, boxes: torch.Tensor, grid: tuple[int, int], fill: torch.Tensor,
                    target: int, batch_size: int) -> torch.Tensor:
        """Logits (P, K) of every position of a map (``occlusion`` calls this): the boxes are
        worked out once (see ``precompute``), then evaluated ``batch_size`` at a time."""
        self.precompute(boxes)
        return self._batches(boxes, fill, batch_size)

    def _batches(self, boxes: torch.Tensor, fill: torch.Tensor, batch_size: int) -> torch.Tensor:
        return torch.cat([self(boxes[i:i + batch_size], fill)
                          for i in range(0, len(boxes), batch_size)])

    @torch.no_grad()
    def __call__(self, boxes: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """Logits (b, K) of the image occluded by ``fill`` at ``boxes`` (b, 4): (y0, x0, y1, x1)
        rows of half-open pixel ranges."""
        if self.graph is None:
            return self._plain(boxes, fill)
        if self._chunk is None:
            self._chunk = self.chunk_size(boxes[0])
        if len(boxes) > self._chunk:
            return torch.cat([self(boxes[i:i + self._chunk], fill)
                              for i in range(0, len(boxes), self._chunk)])
        self._set_centre(boxes)
        self._rows = self._table_rows(boxes)
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

    def _evaluate(self, node: fx.Node, rule: Rule, env: dict[fx.Node, Any],
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
        shape = self.cache[node].shape
        region = self._from_table(node, shape) or self._union([env[n].region for n in patches], shape)
        args = fx.node.map_arg((node.args, node.kwargs),
                               lambda n: self._view(n, env[n], region))
        return Patch(_call(node, modules, *args), region)

    def _set_centre(self, boxes: torch.Tensor) -> None:
        """Patch centres of ``boxes`` as fractions of the image: where ``tau`` centres its cut."""
        _, _, height, width = self.x.shape
        self._centre = ((boxes[:, 0] + boxes[:, 2]).double() / (2 * height),
                        (boxes[:, 1] + boxes[:, 3]).double() / (2 * width))

    def _union(self, regions: list[Region], shape: torch.Size) -> Region:
        y0 = torch.stack([r.y0 for r in regions]).amin(0)
        y1 = torch.stack([r.y1 for r in regions]).amax(0)
        x0 = torch.stack([r.x0 for r in regions]).amin(0)
        x1 = torch.stack([r.x1 for r in regions]).amax(0)
        y0, y1 = cap_box(y0, y1, shape[2], self.tau, self._centre[0])
        x0, x1 = cap_box(x0, x1, shape[3], self.tau, self._centre[1])
        return Region(y0, y1, x0, x1, shape[2], shape[3])

    def _out_region(self, spec: Window, reg: Region, shape: torch.Size) -> Region:
        top, _, left, _ = spec.pads
        y0, y1 = window_axis(reg.y0, reg.y1, top, spec.kernel[0], spec.stride[0],
                              spec.dilation[0], shape[2], self.tau, self._centre[0])
        x0, x1 = window_axis(reg.x0, reg.x1, left, spec.kernel[1], spec.stride[1],
                              spec.dilation[1], shape[3], self.tau, self._centre[1])
        return Region(y0, y1, x0, x1, shape[2], shape[3])

    def _window(self, node: fx.Node, spec: Window, patch: Patch, source: fx.Node) -> Patch:
        shape = self.cache[node].shape
        out = self._from_table(node, shape) or self._out_region(spec, patch.region, shape)
        if self._low is not None and spec.weight is not None \
                and spec.weight[0].numel() >= LOW_PRECISION_MIN_MACS:
            return self._window_change(node, spec, patch, source, out)
        reg = patch.region
        if spec.whole is not None and reg.h == reg.height and reg.w == reg.width:
            # the patch already spans the whole map: run the layer itself, no gather
            out.cy, out.cx = torch.zeros_like(out.cy), torch.zeros_like(out.cx)
            out.h, out.w = shape[2], shape[3]
            return Patch(spec.whole(patch.values), out)
        base, width = self._base(source, spec.pads, spec.pad_value)
        rh = (out.h - 1) * spec.stride[0] + spec.dilation[0] * (spec.kernel[0] - 1) + 1
        rw = (out.w - 1) * spec.stride[1] + spec.dilation[1] * (spec.kernel[1] - 1) + 1
        win = gather(base, width, out.cy * spec.stride[0], out.cx * spec.stride[1], rh, rw,
                      patch, (spec.pads[0], spec.pads[2]))
        return Patch(spec.fn(win), out)

    def _window_change(self, node: fx.Node, spec: Window, patch: Patch, source: fx.Node,
                       out: Region) -> Patch:
        """A convolution over ``out`` computed from its input's change: conv(x + d) = conv(x) +
        conv_without_bias(d), with the change d in low precision (float32 accumulation) and the
        cached output in full precision, so the rounding error scales with the change, not the
        activations."""
        reg = patch.region
        key = id(spec)
        if key not in self._low_weights:
            self._low_weights[key] = spec.weight.detach().to(self._low)
        weight = self._low_weights[key]
        cached_out = self._channels_last(self._output_of.get(node, node))
        top, bottom, left, right = spec.pads
        if reg.h == reg.height and reg.w == reg.width:  # the whole map: no gathers
            change = (patch.values - self._channels_last(source)).to(self._low)
            if (top, left) == (bottom, right):
                delta = F.conv2d(change, weight, None, spec.stride, (top, left), spec.dilation,
                                 spec.groups)
            else:
                delta = F.conv2d(F.pad(change, (left, right, top, bottom)), weight, None,
                                 spec.stride, 0, spec.dilation, spec.groups)
            out.cy, out.cx = torch.zeros_like(out.cy), torch.zeros_like(out.cx)
            out.h, out.w = cached_out.shape[2], cached_out.shape[3]
            return Patch(delta.float() + cached_out, out)
        base, width = self._base(source)
        old = gather(base, width, reg.cy, reg.cx, reg.h, reg.w)
        change = Patch((patch.values - old).to(self._low), reg)
        rh = (out.h - 1) * spec.stride[0] + spec.dilation[0] * (spec.kernel[0] - 1) + 1
        rw = (out.w - 1) * spec.stride[1] + spec.dilation[1] * (spec.kernel[1] - 1) + 1
        win = scatter(out.cy * spec.stride[0], out.cx * spec.stride[1], rh, rw, change,
                       (top, left))
        delta = F.conv2d(win, weight, None, spec.stride, 0, spec.dilation, spec.groups)
        base, width = self._base(self._output_of.get(node, node))
        return Patch(delta.float() + gather(base, width, out.cy, out.cx, out.h, out.w), out)

    def _channels_last(self, node: fx.Node) -> torch.Tensor:
        """The cached output of ``node`` in channels-last memory, the layout of the patches
        (element-wise ops between mixed layouts are several times slower)."""
        if node not in self._cl_cache:
            self._cl_cache[node] = self.cache[node].contiguous(memory_format=torch.channels_last)
        return self._cl_cache[node]

    # -- cost model ----------------------------------------------------------------------------

    def _regions(self, boxes: torch.Tensor
                 ) -> Iterator[tuple[fx.Node, Rule, Region | None]]:
        """Each input-dependent node with the changed boxes of ``boxes`` on its output (None
        where it is computed in full), without computing any values."""
        regions: dict[fx.Node, Region | None] = {}
        _, _, height, width = self.x.shape
        self._set_centre(boxes)
        for node, rule in self.rules.items():
            if rule.kind == "const":
                continue
            out = self.cache[node]
            ins = [regions.get(n) for n in node.all_input_nodes if n in regions]
            if rule.kind == "input":
                region = Region(boxes[:, 0], boxes[:, 2], boxes[:, 1], boxes[:, 3], height, width)
            elif rule.kind in ("dense", "output") or any(r is None for r in ins) or not ins:
                region = None
            elif rule.kind == "window":
                region = self._out_region(rule.window, ins[0], out.shape)
            elif rule.kind == "pad":
                top, _, left, _ = rule.pads
                r = ins[0]
                region = Region(r.y0 + top, r.y1 + top, r.x0 + left, r.x1 + left,
                                out.shape[2], out.shape[3])
            elif rule.kind in ("pointwise", "alias"):
                region = ins[0]
            else:
                region = self._union(ins, out.shape)
            regions[node] = region
            yield node, rule, region

    def flop_ratio(self, boxes: torch.Tensor) -> float:
        """Krypton's theoretical speed-up: full-network multiply-adds of conv and linear layers
        over the mean, across ``boxes``, of the multiply-adds needed to recompute only each
        position's changed boxes (layers after a global one count in full)."""
        if self.graph is None:
            return 1.0
        full = sum(rule.dense_macs for rule in self.rules.values())
        incremental = torch.zeros(len(boxes), dtype=torch.float64)
        for _, rule, region in self._regions(boxes):
            if region is None:
                incremental += rule.dense_macs
            elif rule.kind == "window":
                incremental += rule.window.macs_per_pixel * region.area().double()
        return float(full / incremental.mean()) if full else 1.0

    def chunk_size(self, box: torch.Tensor) -> int:
        """Positions per pass: as many as keep the largest recomputed box within ``CHUNK_BYTES``
        (the cache), measured on a patch of ``box``'s size (y0, x0, y1, x1) at the centre."""
        _, _, height, width = self.x.shape
        h, w = int(box[2] - box[0]), int(box[3] - box[1])
        y0, x0 = (height - h) // 2, (width - w) // 2
        largest = 1
        for node, _, region in self._regions(torch.tensor([[y0, x0, y0 + h, x0 + w]])):
            value = self.cache[node]
            if region is not None and isinstance(value, torch.Tensor) and value.dim() == 4:
                largest = max(largest, value.shape[1] * region.h * region.w
                              * value.element_size())
        return max(1, CHUNK_BYTES // largest)


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


def theoretical_flop_ratio(model: nn.Module, input_shape: tuple[int, int, int],
                           window: int | tuple[int, int], stride: int | tuple[int, int],
                           tau: float | None = None) -> float:
    """Krypton's theoretical speed-up of incremental occlusion for ``model`` on images of
    ``input_shape`` (C, H, W): full-network conv/linear multiply-adds over the mean incremental
    ones across all patch positions (with ``tau``, the thresholded changed boxes)."""
    x = torch.zeros(1, *input_shape)
    boxes, _ = occlusion_boxes(input_shape[1], input_shape[2], window, stride)
    return IncrementalEngine(model, x, tau).flop_ratio(boxes)
