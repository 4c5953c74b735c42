"""The model split after its first convolution, for the methods that sum many gradients.

A convolution is linear, so where the input goes into one ``Conv2d`` and nowhere else, the
gradients of integrated gradients' path images and of SmoothGrad's noisy copies can be summed at
that conv's output and taken back through it once per image (:func:`conv_input_grad`), instead of
once per path image or copy; integrated gradients' path is linear there too, so the conv runs
twice per image instead of once per step. The first conv is the costliest pass back on a 3-channel
input: on resnet18 at 224 it is 12.3 ms of each image's 90 ms gradient on one thread.
"""

from __future__ import annotations

import copy
import weakref
from typing import NamedTuple

import torch
from torch import fx, nn
from torch.nn import functional as F

from pipeline.methods.execution import state_versions, is_scripted


class Stem(NamedTuple):
    """``conv``: the model's first convolution, which alone takes the input; ``rest``: the model
    from that conv's output on (``rest(conv(x)) == model(x)``), which leaves its input as it is."""

    conv: nn.Conv2d
    rest: nn.Module

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """The conv without its bias: linear in ``x``."""
        c = self.conv
        return F.conv2d(x, c.weight.detach(), None, c.stride, c.padding, c.dilation, c.groups)

    def input_grad(self, grad_out: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The gradient at the input (``shape``) of the conv's output gradient ``grad_out``."""
        c = self.conv
        return torch.nn.grad.conv2d_input(shape, c.weight.detach(), grad_out, c.stride, c.padding, c.dilation,
                                          c.groups)


# splits by model, reused while none of the model's parameters or buffers changed
_STEMS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], Stem | None]] = weakref.WeakKeyDictionary()


def split_stem(model: nn.Module) -> Stem | None:
    """``model`` split after its first conv (:class:`Stem`), or None where it cannot be: the model
    does not trace with ``torch.fx``, its input goes anywhere but into one ``Conv2d`` with zero
    padding, or a forward hook on the model or that conv would be skipped. Made once per model."""
    versions = state_versions(model)
    hit = _STEMS.get(model)
    if hit is not None and hit[0] == versions:
        return hit[1]
    stem = None if is_scripted(model) or _hooked(model) else _split(model)
    _STEMS[model] = (versions, stem)
    return stem


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def _split(model: nn.Module) -> Stem | None:
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - control flow on values, untraceable calls: no split
        return None
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1 or len(inputs[0].users) != 1:
        return None
    x, (node,) = inputs[0], inputs[0].users
    conv = model.get_submodule(node.target) if node.op == "call_module" else None
    if (not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros" or isinstance(conv.padding, str)
            or node.args != (x,) or node.kwargs or _hooked(conv)):
        return None
    node.replace_all_uses_with(x)
    graph.erase_node(node)
    rest = fx.GraphModule(model, graph)
    _out_of_place(rest, x)
    return Stem(conv, rest)


def _out_of_place(rest: fx.GraphModule, x: fx.Node) -> None:
    """Make the first ops on ``rest``'s input leave it as it is, so that its gradient can be
    taken: an in-place activation module (resnet's ``ReLU(inplace=True)``) becomes a copy that is
    not in place; any other in-place op gets a copy of the input first."""
    for user in list(x.users):
        module = rest.get_submodule(user.target) if user.op == "call_module" else None
        if module is not None and getattr(module, "inplace", False) is True:
            copied = copy.copy(module)
            copied.inplace = False
            name = f"{str(user.target).replace('.', '_')}_out_of_place"
            rest.add_submodule(name, copied)
            user.target = name
        elif user.kwargs.get("inplace") or (user.op == "call_method" and str(user.target).endswith("_")):
            with rest.graph.inserting_after(x):
                given = rest.graph.call_method("clone", (x,))
            x.replace_all_uses_with(given, delete_user_cb=lambda n: n is not given)
            break
    rest.graph.lint()
    rest.recompile()
