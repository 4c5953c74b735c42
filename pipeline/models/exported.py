"""model=exported: a ``torch.export`` program (``.pt2``) as a module tree that hooks work on.

``torch.export.unflatten`` turns a program back into modules named as in the original model
(``features.conv1``), but each is a graph (an ``InterpreterModule``), not a ``nn.Conv2d``: hooks
fire on it, while whatever looks at module types (guided backprop's and the deconvnet's ReLUs,
CAM's Linear head, Krypton's conv rules, the default layers) would see none. So every leaf whose
original class was a standard ``torch.nn`` layer (the program records it) is rebuilt as that class
from its graph's one call, sharing the program's parameter tensors, and kept only where it gives
the graph's own output on a real forward pass; ``nn.Sequential`` containers that are plain chains
become ``nn.Sequential`` again. What cannot be rebuilt stays a graph module. The program is made
functional first (``run_decompositions({})``), so no in-place op hides an activation from a hook.

Programs must take a dynamic batch: stages run 1 image at a time and up to ``extract.batch_size``,
and a forward hook has to see the whole batch at once, so running a fixed-batch program image by
image would break every hook-based stage; re-exporting is one line (:data:`EXPORT_HINT`).
"""

from __future__ import annotations

import logging
import operator
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.export import ExportedProgram
from torch.export.unflatten import InterpreterModule

from pipeline.errors import PipelineError
from pipeline.methods.hooks import watching
from pipeline.models.common import ModelBundle, image_transform, input_stats, read_class_names, tensors_key

aten = torch.ops.aten

EXPORT_HINT = ("torch.export.save(torch.export.export(model.eval(), (torch.randn(2, C, H, W),), "
               "dynamic_shapes=({0: torch.export.Dim('batch')},)), 'model.pt2')")
# ops that only a program exported in training mode contains (batch statistics, random dropout)
TRAINING_OPS = {aten._native_batch_norm_legit_functional.default, aten._native_batch_norm_legit.default,
                aten.native_dropout.default, aten.bernoulli.p, aten.bernoulli_.float, aten.rand_like.default}


def archive_kind(path: Path) -> str:
    """What a model file is, from its zip entries: ``exported`` (torch.export.save), ``torchscript``
    (ScriptModule.save / torch.jit.save), ``checkpoint`` (torch.save) or ``unknown``."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = {name.split("/", 1)[-1] for name in archive.namelist()}
    except (zipfile.BadZipFile, OSError):
        return "unknown"
    if "archive_format" in entries:
        return "exported"
    if "constants.pkl" in entries or any(e.startswith("code/") for e in entries):
        return "torchscript"
    return "checkpoint" if "data.pkl" in entries else "unknown"


def wrong_file(source: str, path: Path, kind: str) -> PipelineError:
    """The one-line error for a model file of the wrong kind for ``model=<source>``, naming the fix."""
    what = {"exported": "a torch.export program", "torchscript": "a TorchScript file",
            "checkpoint": "a torch.save checkpoint (a state dict or a pickled module)"}.get(kind)
    fix = {("exported", "torchscript"): "load it with model=torchscript (stages that need hooks do not run on "
                                        f"TorchScript), or export the nn.Module again: {EXPORT_HINT}",
           ("torchscript", "exported"): f"load it with model=exported model.path={path}",
           ("exported", "checkpoint"): "load a state dict with model=torchvision or model=timm and "
                                       f"model.weights_path, or export the nn.Module: {EXPORT_HINT}",
           ("torchscript", "checkpoint"): "load a state dict with model=torchvision or model=timm and "
                                          "model.weights_path, or export the nn.Module with torch.export "
                                          "and load it with model=exported"}
    want = "a torch.export program (.pt2)" if source == "exported" else "a TorchScript file"
    hint = fix.get((source, kind), f"export one with {EXPORT_HINT}" if source == "exported"
                   else "save one with torch.jit.script(model).save(path)")
    its = f"is {what}, not {want}" if kind in ("exported", "torchscript", "checkpoint") else f"is not {want}"
    return PipelineError(f"model={source}: '{path}' {its}: {hint}.")


def load_program(path: Path) -> ExportedProgram:
    """The program saved at ``path``; a one-line error for a missing file or a file of another kind."""
    if not path.is_file():
        raise PipelineError(f"model=exported: file '{path}' does not exist. Set model.path to a .pt2 file "
                            f"written by torch.export.save, e.g. {EXPORT_HINT}.")
    kind = archive_kind(path)
    if kind != "exported":
        raise wrong_file("exported", path, kind)
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(logging.CRITICAL)  # torch logs a traceback for a broken archive before raising
    try:
        return torch.export.load(str(path))
    except Exception as e:  # a damaged archive or one from an incompatible torch version
        raise PipelineError(f"model=exported: cannot load '{path}' ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}). Export it again with this torch: {EXPORT_HINT}.")
    finally:
        export_log.setLevel(level)


@dataclass(frozen=True)
class ProgramInput:
    """The program's one image input: channels, and height and width (None where dynamic)."""

    channels: int
    height: int | None
    width: int | None


def check_program(ep: ExportedProgram, path: Path) -> ProgramInput:
    """One 4-D image input with a dynamic batch (from 1, unbounded), exported in eval mode."""
    where = f"model=exported: '{path}'"
    user_inputs = list(ep.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        raise PipelineError(f"{where} takes {len(user_inputs)} inputs; the pipeline feeds one image batch "
                            f"(B, C, H, W). Export a module whose forward takes only the images: {EXPORT_HINT}.")
    node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == user_inputs[0])
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 4:
        raise PipelineError(f"{where} takes {tuple(val.shape) if isinstance(val, torch.Tensor) else val!r}, not an "
                            f"image batch (B, C, H, W). Export it on images: {EXPORT_HINT}.")
    batch, channels, height, width = val.shape
    if not isinstance(batch, torch.SymInt):
        raise PipelineError(f"{where} was exported for batches of exactly {batch} image(s); the pipeline runs "
                            f"batches of any size. Export it with a dynamic batch: {EXPORT_HINT}.")
    limits = ep.range_constraints.get(batch.node.expr)
    if limits is not None and (limits.lower > 1 or bool(limits.upper < 2 ** 31)):
        raise PipelineError(f"{where} takes batches of {max(1, int(limits.lower))}..{limits.upper} images only; the "
                            "pipeline runs batches from 1 up to extract.batch_size. Export it with Dim('batch') and "
                            f"no min or max: {EXPORT_HINT}.")
    if not ep.call_spec.out_spec.is_leaf():
        raise PipelineError(f"{where} returns {ep.call_spec.out_spec.type.__name__} outputs, not one logits tensor "
                            f"(B, classes): export a module whose forward returns the class scores only.")
    if not isinstance(channels, int):
        raise PipelineError(f"{where} has a dynamic channel dimension; export it with a fixed one: {EXPORT_HINT}.")
    if any(n.op == "call_function" and n.target in TRAINING_OPS for n in ep.graph.nodes):
        raise PipelineError(f"{where} was exported in training mode (batch statistics or random dropout); "
                            f"call model.eval() before torch.export.export: {EXPORT_HINT}.")
    return ProgramInput(channels, height if isinstance(height, int) else None,
                        width if isinstance(width, int) else None)


def program_key(ep: ExportedProgram) -> str:
    """The program's content key: its graph's code and every parameter, buffer and constant, so
    the same model exported again keys the same, and a change to the graph or a weight does not."""
    return tensors_key([*ep.state_dict.items(), *ep.constants.items()], "exported\n" + ep.graph_module.code)


def layer_types(ep: ExportedProgram) -> dict[str, str]:
    """Each module's original class (``torch.nn.modules.conv.Conv2d``), by name, as the program recorded it."""
    types: dict[str, str] = {}
    for node in ep.graph.nodes:
        for path, ty in (node.meta.get("nn_module_stack") or {}).values():
            types.setdefault(path.split("@")[0], ty)
    return types


# ------------------------------------------------------------------------------------------------
# Rebuilding torch.nn layers from their graphs


def _bound(call: fx.Node) -> list[Any]:
    """The call's arguments in schema order, defaults filled in."""
    values = []
    for i, arg in enumerate(call.target._schema.arguments):
        if i < len(call.args):
            values.append(call.args[i])
        elif arg.name in call.kwargs:
            values.append(call.kwargs[arg.name])
        else:
            values.append(arg.default_value if arg.has_default_value() else None)
    return values


def _own(leaf: nn.Module) -> dict[str, torch.Tensor]:
    """The leaf's own parameters and buffers, by name."""
    return dict(leaf.named_parameters(recurse=False)) | dict(leaf.named_buffers(recurse=False))


def _tensor(leaf: nn.Module, node: Any) -> torch.Tensor | None:
    """The parameter or buffer of the leaf that a ``get_attr`` node reads, else None."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return _own(leaf).get(str(node.target))
    return None


def _share(module: nn.Module, leaf: nn.Module, names: dict[str, Any]) -> nn.Module | None:
    """``module`` with the leaf's own parameters and buffers under ``names`` (a node that is None:
    absent); None when one is not a parameter or buffer of the leaf (a constant the layer cannot own)."""
    for name, node in names.items():
        if node is None:
            continue
        value = _tensor(leaf, node)
        if value is None:
            return None
        setattr(module, name, value)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and "num_batches_tracked" in _own(leaf):
        module.num_batches_tracked = _own(leaf)["num_batches_tracked"]
    return module


def _conv(leaf: nn.Module, call: fx.Node, cls: str) -> nn.Module | None:
    _, w, b, stride, padding, dilation, groups = _bound(call)
    weight = _tensor(leaf, w)
    if cls != "Conv2d" or weight is None:
        return None
    conv = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), tuple(stride), padding
                     if isinstance(padding, str) else tuple(padding), tuple(dilation), groups, bias=b is not None)
    return _share(conv, leaf, {"weight": w, "bias": b})


def _linear(leaf: nn.Module, call: fx.Node, cls: str) -> nn.Module | None:
    _, w, b = _bound(call)
    weight = _tensor(leaf, w)
    if cls != "Linear" or weight is None:
        return None
    return _share(nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None), leaf, {"weight": w, "bias": b})


def _batchnorm(leaf: nn.Module, call: fx.Node, cls: str) -> nn.Module | None:
    _, w, b, mean, var, momentum, eps = _bound(call)
    kinds = {"BatchNorm1d": nn.BatchNorm1d, "BatchNorm2d": nn.BatchNorm2d}
    running = _tensor(leaf, mean)
    if cls not in kinds or running is None:
        return None
    bn = kinds[cls](running.shape[0], eps=eps, momentum=momentum, affine=w is not None)
    return _share(bn, leaf, {"weight": w, "bias": b, "running_mean": mean, "running_var": var})


def _hardtanh(leaf: nn.Module, call: fx.Node, cls: str) -> nn.Module | None:
    _, low, high = _bound(call)
    if cls == "ReLU6":
        return nn.ReLU6() if (low, high) == (0.0, 6.0) else None
    return nn.Hardtanh(low, high) if cls == "Hardtanh" else None


def _pool(kind: type[nn.Module]) -> Callable[[nn.Module, fx.Node, str], nn.Module | None]:
    def build(leaf: nn.Module, call: fx.Node, cls: str) -> nn.Module | None:
        if cls != kind.__name__:
            return None
        _, kernel, stride, padding, *rest = _bound(call)
        size = tuple(kernel)
        if kind is nn.MaxPool2d:
            dilation, ceil = rest
            return nn.MaxPool2d(size, tuple(stride) or size, tuple(padding), tuple(dilation), ceil_mode=ceil)
        ceil, include_pad, divisor = rest
        return nn.AvgPool2d(size, tuple(stride) or size, tuple(padding), ceil, include_pad, divisor)
    return build


def _simple(kind: type[nn.Module], *names: str) -> Callable[[nn.Module, fx.Node, str], nn.Module | None]:
    """A layer whose constructor takes the call's arguments after the input, by position (``names``
    says which of them, in order)."""
    def build(leaf: nn.Module, call: fx.Node, cls: str) -> nn.Module | None:
        if cls != kind.__name__:
            return None
        values = _bound(call)[1:1 + len(names)]
        return kind(**dict(zip(names, values)))
    return build


REBUILD: dict[Any, Callable[[nn.Module, fx.Node, str], nn.Module | None]] = {
    aten.conv2d.default: _conv,
    aten.conv2d.padding: _conv,
    aten.linear.default: _linear,
    aten._native_batch_norm_legit_no_training.default: _batchnorm,
    aten.relu.default: _simple(nn.ReLU),
    aten.hardtanh.default: _hardtanh,
    aten.silu.default: _simple(nn.SiLU),
    aten.sigmoid.default: _simple(nn.Sigmoid),
    aten.tanh.default: _simple(nn.Tanh),
    aten.hardswish.default: _simple(nn.Hardswish),
    aten.hardsigmoid.default: _simple(nn.Hardsigmoid),
    aten.gelu.default: _simple(nn.GELU, "approximate"),
    aten.leaky_relu.default: _simple(nn.LeakyReLU, "negative_slope"),
    aten.max_pool2d.default: _pool(nn.MaxPool2d),
    aten.avg_pool2d.default: _pool(nn.AvgPool2d),
    aten.adaptive_avg_pool2d.default: _simple(nn.AdaptiveAvgPool2d, "output_size"),
}
FLATTEN_OPS = {aten.view.default, aten.reshape.default, aten.flatten.using_ints}


def _only_call(leaf: InterpreterModule) -> fx.Node | None:
    """The graph's one operation (a following ``getitem 0`` allowed), or None."""
    calls = [n for n in leaf.graph.nodes if n.op == "call_function" and n.target is not operator.getitem]
    return calls[0] if len(calls) == 1 else None


def _flatten(inp: torch.Tensor, out: torch.Tensor) -> nn.Module | None:
    """The ``nn.Flatten`` that turns ``inp``'s shape into ``out``'s, if one does."""
    for start in range(inp.dim()):
        end = start + inp.dim() - out.dim()
        if end < inp.dim() and torch.flatten(inp, start, end).shape == out.shape:
            return nn.Flatten(start, end)
    return None


def _close(a: object, b: object) -> bool:
    """Same shape and values to float32 rounding (relative to the largest value)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return False
    if not b.numel():
        return True
    return float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max()))


class _Rebuilder:
    """Records each graph module's calls on one forward pass and tries its torch.nn twin on them."""

    def __init__(self, tree: nn.Module, types: dict[str, str]) -> None:
        self.tree = tree
        self.types = types
        self.graphs = {name: m for name, m in tree.named_modules() if name and isinstance(m, InterpreterModule)}
        self.tensor_args: dict[str, tuple[int, ...]] = {}   # positions of the tensor arguments, per module
        self.twins: dict[str, nn.Module | None] = {}        # a leaf's rebuilt layer, None once it failed

    def cls(self, name: str) -> str | None:
        """The short name of module ``name``'s original class when that is a torch.nn class."""
        ty = self.types.get(name, "")
        return ty.rsplit(".", 1)[-1] if ty.startswith("torch.nn.modules.") else None

    def record(self, x: torch.Tensor) -> None:
        """One forward pass on ``x``, then each leaf's twin checked on every call of the leaf."""
        with watching(self.tree, lambda name, _m: name in self.graphs) as calls, torch.no_grad():
            self.tree(x)
            for call in calls:
                self._check(call.name, call.module, call.inputs, call.output)

    def _check(self, name: str, module: nn.Module, args: tuple, out: object) -> None:
        self.tensor_args[name] = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
        if name in self.twins and self.twins[name] is None:
            return
        if any(True for _ in module.children()) or len(self.tensor_args[name]) != 1:
            self.twins[name] = None
            return
        inp = args[self.tensor_args[name][0]]
        twin = self.twins[name] if name in self.twins else self._twin(name, module, inp, out)
        self.twins[name] = twin if twin is not None and _close(twin(inp), out) else None

    def _twin(self, name: str, leaf: InterpreterModule, inp: torch.Tensor, out: object) -> nn.Module | None:
        call, cls = _only_call(leaf), self.cls(name)
        if call is None or cls is None or not isinstance(out, torch.Tensor):
            return None
        if cls == "Flatten" and call.target in FLATTEN_OPS:
            return _flatten(inp, out)
        build = REBUILD.get(call.target)
        twin = build(leaf, call, cls) if build is not None else None
        return twin.eval() if twin is not None else None  # before its first call: shared BatchNorm statistics

    def swap(self, name: str, new: nn.Module) -> None:
        """Put ``new`` in place of module ``name`` and pass it only its tensor argument."""
        parent_name, _, local = name.rpartition(".")
        parent = self.tree.get_submodule(parent_name)
        keep = self.tensor_args[name]
        for node in parent.graph.nodes:
            if node.op == "call_module" and node.target == local:
                node.args = tuple(node.args[i] for i in keep)
        setattr(parent, local, new)
        parent.graph.eliminate_dead_code()

    def sequential(self, name: str, module: InterpreterModule) -> nn.Sequential | None:
        """An ``nn.Sequential`` of the container's children when its graph is a plain chain of them."""
        if self.cls(name) != "Sequential" or len(self.tensor_args.get(name, ())) != 1:
            return None
        nodes = [n for n in module.graph.nodes if n.op not in ("placeholder", "output")]
        placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
        prev = placeholders[self.tensor_args[name][0]]
        order: list[str] = []
        for node in nodes:
            if node.op != "call_module" or node.args != (prev,) or node.kwargs or node.target in order:
                return None
            order.append(str(node.target))
            prev = node
        output = next(n for n in module.graph.nodes if n.op == "output")
        if not order or output.args[0] is not prev:
            return None
        children = dict(module.named_children())
        called = set(order)
        if set(children) - called:  # children the graph never calls (eval-mode dropout, identity)
            if not all(c.isdigit() for c in children):
                return None
            order = sorted(children, key=int)
        return nn.Sequential(OrderedDict((c, children[c] if c in called else nn.Identity()) for c in order))

    def run(self) -> None:
        """Swap in every verified leaf, then every plain-chain Sequential, deepest first."""
        for name in sorted(self.graphs, key=lambda n: -n.count(".")):
            module = self.tree.get_submodule(name)
            twin = self.twins.get(name)
            if twin is None and isinstance(module, InterpreterModule) and any(True for _ in module.children()):
                module.graph.eliminate_dead_code()
                twin = self.sequential(name, module)
            if twin is not None:
                self.swap(name, twin.eval())


def _class_name(types: dict[str, str], name: str) -> str:
    """The original class's name for module ``name`` (an identifier), or GraphModule."""
    short = types.get(name, "").rsplit(".", 1)[-1]
    return short if short.isidentifier() else "GraphModule"


def _graph_modules(tree: nn.Module, types: dict[str, str]) -> fx.GraphModule:
    """The tree with each remaining graph module, and the root, as an ``fx.GraphModule`` named
    after its original class (``BasicBlock``, ``ResNet``): plain modules that torch.fx traces (for
    Krypton's occlusion and the BatchNorm folding of Score-CAM and RISE) and that run generated
    code instead of an interpreter. The root returns the logits tensor itself."""
    graphs = [n for n, m in tree.named_modules() if n and isinstance(m, InterpreterModule)]
    for name in sorted(graphs, key=lambda n: -n.count(".")):
        parent_name, _, local = name.rpartition(".")
        module = tree.get_submodule(name)
        setattr(tree.get_submodule(parent_name), local, fx.GraphModule(module, module.graph, _class_name(types, name)))
    output = next(n for n in tree.graph.nodes if n.op == "output")
    (outputs,) = output.args
    output.args = (outputs[0] if isinstance(outputs, (tuple, list)) else outputs,)
    return fx.GraphModule(tree, tree.graph, _class_name(types, ""))


def module_tree(ep: ExportedProgram, example: torch.Tensor) -> nn.Module:
    """The (functional: ``run_decompositions({})``) program as an eval-mode module tree with the
    original names (see the module docstring); ``example`` (1,C,H,W) is the forward pass the rebuilt
    layers are checked on."""
    types = layer_types(ep)
    tree = torch.export.unflatten(ep)
    rebuilder = _Rebuilder(tree, types)
    rebuilder.record(example)
    rebuilder.run()
    return _graph_modules(tree, types).eval()


def _input_size(cfg: Any, spec: ProgramInput, path: Path) -> tuple[int, int]:
    """(channels, side) of the model's input: the program's own, which ``model.channels`` and
    ``model.image_size`` may repeat but not contradict; ``model.image_size`` where H and W are dynamic."""
    where = f"model=exported: '{path}'"
    channels = cfg.get("channels")
    if channels is not None and int(channels) != spec.channels:
        raise PipelineError(f"{where} takes {spec.channels}-channel images but model.channels={channels}: "
                            f"set model.channels={spec.channels} (or null).")
    fixed = {s for s in (spec.height, spec.width) if s is not None}
    if len(fixed) > 1:
        raise PipelineError(f"{where} takes {spec.height}x{spec.width} images; the pipeline feeds square crops: "
                            "export it at a square size (H = W).")
    size = cfg.get("image_size")
    if fixed and size is not None and int(size) not in fixed:
        raise PipelineError(f"{where} takes {min(fixed)}x{min(fixed)} images but model.image_size={size}: set "
                            f"model.image_size={min(fixed)} (or null), or export the model at {size}x{size}.")
    if not fixed and size is None:
        raise PipelineError(f"{where} has a dynamic height and width: set model.image_size to the side the model "
                            "expects.")
    return spec.channels, int(min(fixed) if fixed else size)


def build_exported(cfg: Any) -> ModelBundle:
    """``model=exported model.path=model.pt2``: the program as a hookable module tree (names as in
    the original model), its input size from the program, keyed by the program's content."""
    path = Path(str(cfg.get("path") or "")).expanduser()
    ep = load_program(path).run_decompositions({})
    channels, size = _input_size(cfg, check_program(ep, path), path)
    example = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(0))
    try:
        tree = module_tree(ep, example)
        with torch.no_grad():
            logits = tree(example)
    except RuntimeError as e:  # the program's own shape guards (a dynamic side out of its range)
        raise PipelineError(f"model=exported: '{path}' does not run on a (1, {channels}, {size}, {size}) input "
                            f"({str(e).strip().splitlines()[0][:200]}). Set model.image_size to a size it takes.")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise PipelineError(f"model=exported: '{path}' returns {got}, not logits (B, classes): export a module "
                            "whose forward returns the class scores only.")
    mean, std = input_stats(cfg, channels)
    return ModelBundle(path.stem, tree, image_transform(size, cfg.get("resize") or size, mean, std, channels),
                       read_class_names(cfg.get("class_names"), int(logits.shape[1])), program_key(ep),
                       (channels, size, size), mean, std, list(cfg.get("layers") or []) or None)
