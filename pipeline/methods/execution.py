"""How the methods run a model fast: pass sizes on the CPU, the channels_last layout (with a
channels_last copy of the weights), BatchNorm folded into the convs, bfloat16 where it is native.
One home, so that every method and the shared pass run the model the same way and give the same
numbers.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse


def is_scripted(model: nn.Module) -> bool:
    """Whether ``model`` is a TorchScript module (which takes no forward hooks)."""
    return isinstance(model, torch.jit.ScriptModule)


CPU_PASS_PIXELS = 128 * 1024  # input pixels per CPU forward/backward pass


def pass_size(x: torch.Tensor) -> int:
    """Images per forward/backward pass for the batch ``x``: on the CPU about ``CPU_PASS_PIXELS``
    input pixels a pass, where bigger passes run slower per image once their activations leave the
    cache (measured on one thread: the input gradient of EfficientNet-Lite0 at 224, 59 ms an image
    in pairs, 81 alone, 128 in 32s; of digits_cnn at 64x64, 1.6-1.8 ms an image in passes of 32,
    2.8 in 192s, 4.0 in 512s), else the whole batch."""
    if x.device.type != "cpu":
        return x.shape[0]
    return max(1, min(x.shape[0], CPU_PASS_PIXELS // (x.shape[-2] * x.shape[-1])))


def low_precision_supported() -> bool:
    """Whether this CPU runs bfloat16 convolutions natively (AVX512-BF16 or AMX); elsewhere
    they are emulated and slower than float32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def low_precision_active(device: torch.device) -> bool:
    """Whether ``low_precision`` runs in bfloat16 on ``device``: on any accelerator, or a CPU with
    native bfloat16 (the occlusion engines and the masked methods ask this, and key on the answer)."""
    return device.type != "cpu" or low_precision_supported()


class FastLayout:
    """Calls a model in ``channels_last`` on the CPU, the layout oneDNN's convolutions and pools run
    natively (1.1-1.5x faster), until the model rejects it (a ``view`` of a feature map, say): from
    then on in the default layout. ``memory_format`` says which layout is in use.

    ``weights=True`` runs a copy whose 4-D weights are in ``channels_last`` too
    (:func:`channels_last_copy`): a one-channel input's layout is ambiguous, so without it a first
    conv with plain weights falls back to the default layout for the whole network (2.4x slower on
    the digits CNN, most of it in the max-pools). Hooks then go on :attr:`model`, the copy."""

    def __init__(self, model: nn.Module, device: torch.device, weights: bool = False) -> None:
        self.original = model
        fast = device.type == "cpu" and model not in _REJECTS_LAYOUT
        self.memory_format = torch.channels_last if fast else torch.contiguous_format
        self.model = channels_last_copy(model) if weights and fast else model

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.apply(lambda model, b: model(b), batch)

    def apply(self, fn: Callable[[nn.Module, torch.Tensor], Any], batch: torch.Tensor) -> Any:
        """``fn(model, batch)`` in the fast layout, or on the model as given once that failed."""
        if self.memory_format is not torch.channels_last:
            return fn(self.model, batch)
        try:
            return fn(self.model, batch.contiguous(memory_format=torch.channels_last))
        except RuntimeError:
            out = fn(self.original, batch)  # raises again when the layout was not the problem
            _REJECTS_LAYOUT.add(self.original)
            self.memory_format = torch.contiguous_format
            self.model = self.original
            return out


# channels_last copies by model, reused while none of the model's parameters or buffers changed
_CHANNELS_LAST: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], nn.Module | None]] = weakref.WeakKeyDictionary()
_COPIES: weakref.WeakSet[nn.Module] = weakref.WeakSet()          # those copies: already in the layout
_REJECTS_LAYOUT: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models that failed in channels_last


def channels_last_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its 4-D parameters and buffers in ``channels_last`` (the same values);
    ``model`` itself when it cannot be copied (TorchScript). Made once per model, remade when its
    weights change; a copy itself as it is."""
    if is_scripted(model) or model in _COPIES:
        return model
    versions = _state_versions(model)
    hit = _CHANNELS_LAST.get(model)
    if hit is not None and hit[0] == versions:
        return model if hit[1] is None else hit[1]
    try:
        fast: nn.Module | None = copy.deepcopy(model).to(memory_format=torch.channels_last)
    except Exception:  # a module that does not deep-copy: as it is
        fast = None  # (not the model itself: the entry would keep its key alive)
    _CHANNELS_LAST[model] = (versions, fast)
    if fast is None:
        return model
    _COPIES.add(fast)
    return fast


def on_fast_model(fn: Callable[[nn.Module, torch.Tensor], Any], model: nn.Module, x: torch.Tensor) -> Any:
    """``fn(model, x)`` as every gradient method and the shared pass run it: on the CPU on the
    model's channels_last copy with ``x`` in that layout (:class:`FastLayout`), or on the model as
    it is once it rejected the layout. Hooks ``fn`` sets go on the model it is given. On one thread
    EfficientNet-Lite0's input gradient at 224 is about 1.12x faster so, with the same gradient;
    resnet18's the same speed, 1.7e-6 of the largest value off (the convolutions sum in another
    order)."""
    return FastLayout(model, x.device, weights=True).apply(fn, x)


# folded copies by model: reused while none of the model's parameters or buffers changed
_FOLDED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], nn.Module]] = weakref.WeakKeyDictionary()


def _state_versions(model: nn.Module) -> tuple[int, ...]:
    """Identity and in-place version of every parameter and buffer: changes when the weights do."""
    return tuple(v for t in (*model.parameters(), *model.buffers()) for v in (id(t), t._version))


def fold_batchnorm(model: nn.Module, x0: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with each BatchNorm folded into the conv before it (``torch.fx``'s
    ``fuse``), which spares a pass over every activation forward and backward; ``model`` itself
    when it is not in eval mode, does not trace, or gives other logits on ``x0`` than the copy
    (beyond rounding). The copy is made once per model and remade when its weights change."""
    if model.training or is_scripted(model):
        return model
    versions = _state_versions(model)
    hit = _FOLDED.get(model)
    if hit is not None and hit[0] == versions:
        return hit[1]
    try:
        folded = fuse(model)
    except Exception:  # not traceable (control flow on values, a module in train mode): as it is
        folded = model
    if folded is not model:
        with torch.no_grad():
            ref = model(x0)
            if not (folded(x0) - ref).abs().max() <= 1e-4 * ref.abs().max():
                folded = model
    _FOLDED[model] = (versions, folded)
    return folded


class Runner(FastLayout):
    """The model on batches of (masked or path) inputs, in the fast layout (:class:`FastLayout`)
    and with its BatchNorms folded (:func:`fold_batchnorm`) unless ``fold`` is off (for hooks on
    the model); with ``low_precision`` under bfloat16 autocast where that is native
    (:func:`low_precision_active`), float32 logits either way."""

    def __init__(self, model: nn.Module, x0: torch.Tensor, fold: bool = True, low_precision: bool = False) -> None:
        super().__init__(fold_batchnorm(model, x0) if fold else model, x0.device)
        self.low_precision = low_precision and low_precision_active(x0.device)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if not self.low_precision:
            return super().__call__(batch)
        with torch.autocast(batch.device.type, dtype=torch.bfloat16):
            return super().__call__(batch).float()
