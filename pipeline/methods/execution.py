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


CPU_PASS_PIXELS = 192 * 1024  # input pixels per CPU forward/backward pass, at least
PASS_WEIGHT_RATIO = 6         # bytes a pass keeps for its backward per byte of weights, at least
PASS_MAX_IMAGES = 64          # images per pass the weight rule may ask for, at most
PASS_MAX_BYTES = 2 << 30      # bytes a pass may keep for its backward, at most


def pass_size(model: nn.Module, x: torch.Tensor) -> int:
    """Images per forward/backward pass of ``model`` for the batch ``x``: the whole batch off the
    CPU; on the CPU the larger of two rules. About ``CPU_PASS_PIXELS`` input pixels a pass, as
    bigger passes run slower per image once their activations leave the cache (a memory-bound net
    such as EfficientNet-Lite0, and the digits CNNs). And enough images that a pass keeps
    ``PASS_WEIGHT_RATIO`` times the model's weight bytes for its backward (at most
    ``PASS_MAX_IMAGES``), since each pass streams and reorders every weight: a compute-bound net
    with big weights such as resnet18 runs faster per image in bigger passes.

    Measured on one thread, input gradient at 224 in ms an image by images a pass: resnet18
    (45 MB of weights, 21 MB kept an image: 13 a pass) 98.8 / 91.1 / 87.7 / 85.9 / 96.3 at 4 / 8 /
    12 / 16 / 24, 123 at 2; EfficientNet-Lite0 (18 MB, 76 MB: 3) 47.5 / 54.4 / 48.6 / 54.9 / 69.9 at
    3 / 4 / 5 / 6 / 8; at 64x64 (48) digits_cnn flat at 1.24-1.29 from 32 to 128, 2.3 at 256; and
    digits_cnn_fc (16 MB of weights, 0.9 MB kept: 64) 1.70 / 1.72 / 2.22 / 3.01 at 32 / 64 / 128 /
    320."""
    if x.device.type != "cpu":
        return x.shape[0]
    by_pixels = CPU_PASS_PIXELS // (x.shape[-2] * x.shape[-1])
    kept = kept_bytes(model, x) if x.shape[0] > by_pixels else 0  # no pass to size otherwise
    if kept:
        weights = sum(t.numel() * t.element_size() for t in model.parameters())
        by_weights = min(-(-PASS_WEIGHT_RATIO * weights // kept), PASS_MAX_IMAGES, PASS_MAX_BYTES // kept)
        by_pixels = max(by_pixels, by_weights)
    return max(1, min(x.shape[0], by_pixels))


# bytes a forward pass keeps for its backward per image, by model and input (shape, dtype, layout)
_KEPT: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], int]] = weakref.WeakKeyDictionary()


def kept_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of activations a forward pass of ``model`` keeps for its backward, for one image of
    ``x`` (its weights not counted): measured once per model and input shape on one image, 0 where
    that cannot be seen (a TorchScript model, a forward that fails: its own pass then says why) or
    should not be (a model in train mode, whose forward moves its BatchNorm statistics)."""
    layout = layout_of(x)
    key = (tuple(x.shape[1:]), x.dtype, layout)
    known = _KEPT.setdefault(model, {})
    if is_scripted(model) or model.training:  # a forward in train mode would move BatchNorm statistics
        return 0
    if key not in known:
        weights = {t.data_ptr() for t in (*model.parameters(), *model.buffers())}
        seen: set[int] = set()
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            ptr = t.data_ptr()
            if ptr not in weights and ptr not in seen:
                seen.add(ptr)
                total += t.numel() * t.element_size()
            return t

        one = x[:1].detach().clone(memory_format=layout).requires_grad_(True)
        try:
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(one)
        except Exception:  # noqa: BLE001 - the real pass raises with its own message
            total = 0
        known[key] = total
    return known[key]


def layout_of(x: torch.Tensor) -> torch.memory_format:
    """``channels_last`` for a 4-D batch in that layout (and not also plain contiguous, as a
    one-channel batch can be), else the default layout."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


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
    versions = state_versions(model)
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


def state_versions(model: nn.Module) -> tuple[int, ...]:
    """Identity and in-place version of every parameter and buffer: changes when the weights do."""
    return tuple(v for t in (*model.parameters(), *model.buffers()) for v in (id(t), t._version))


def fold_batchnorm(model: nn.Module, x0: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with each BatchNorm folded into the conv before it (``torch.fx``'s
    ``fuse``), which spares a pass over every activation forward and backward; ``model`` itself
    when it is not in eval mode, does not trace, or gives other logits on ``x0`` than the copy
    (beyond rounding). The copy is made once per model and remade when its weights change."""
    if model.training or is_scripted(model):
        return model
    versions = state_versions(model)
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
