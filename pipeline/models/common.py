"""What every model source shares: the bundle the stages get, content keys, checkpoints, class
names and the default preprocessing. A leaf: the sources (:mod:`pipeline.models.bundle`,
:mod:`pipeline.models.custom`, :mod:`pipeline.models.exported`) import it, it imports none of them."""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

from pipeline.errors import PipelineError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_MEAN = (0.1,)
DIGITS_STD = (0.3,)


@dataclass
class ModelBundle:
    """Everything the stages need to know about a model."""

    name: str
    module: nn.Module
    transform: Callable[[Image.Image], torch.Tensor]
    class_names: list[str]
    key: str
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_layers: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def takes_hooks(self) -> bool:
        """Whether forward hooks work on the module (TorchScript modules refuse them)."""
        return not isinstance(self.module, torch.jit.ScriptModule)

    def to(self, device: torch.device) -> ModelBundle:
        self.module.to(device)
        return self


def tensors_key(items: Iterable[tuple[str, Any]], extra: str = "") -> str:
    """sha256 over named tensors (names, shapes, dtypes, bytes) in name order, after ``extra``; a
    value that is not a tensor (a script object among a program's constants) counts by its type."""
    h = hashlib.sha256(extra.encode())
    for name, t in sorted(items, key=operator.itemgetter(0)):
        h.update(name.encode())
        if not isinstance(t, torch.Tensor):
            h.update(type(t).__name__.encode())
            continue
        t = t.detach().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def weights_key(module: nn.Module, extra: str = "") -> str:
    """sha256 over the state dict (names, shapes, bytes): the model's content key."""
    return tensors_key(module.state_dict().items(), extra)


def input_stats(cfg: Any, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``model.mean`` / ``model.std``, or ImageNet's for 3 channels and 0.5 for others, for files
    that do not say how their inputs were normalised."""
    mean = tuple(cfg.get("mean") or (IMAGENET_MEAN if channels == 3 else (0.5,) * channels))
    std = tuple(cfg.get("std") or (IMAGENET_STD if channels == 3 else (0.5,) * channels))
    return mean, std


def load_checkpoint(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a user file, loaded with ``weights_only=True``; unwraps {'state_dict': ...}."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PipelineError(f"{what}: checkpoint '{p}' does not exist. Check the path.")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad pickles
        raise PipelineError(f"{what}: cannot load '{p}' as a weights-only checkpoint ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}). Save it with torch.save(model.state_dict(), path).")
    for k in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(k), dict):
            obj = obj[k]
    if not isinstance(obj, dict):
        raise PipelineError(f"{what}: '{p}' holds a {type(obj).__name__}, not a state dict.")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_state(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict with an error that names the missing and unexpected keys."""
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise PipelineError(f"{what}: checkpoint does not match the architecture ({str(e).splitlines()[-1].strip()[:300]}).")
    if result.missing_keys or result.unexpected_keys:
        raise PipelineError(f"{what}: checkpoint does not match the architecture "
                            f"(missing: {result.missing_keys[:5]}, unexpected: {result.unexpected_keys[:5]}).")


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names that ship inside torchvision."""
    from torchvision.models import ResNet18_Weights
    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def read_class_names(spec: Any, num_classes: int) -> list[str]:
    """Class names from 'imagenet', a list, a text file (one per line), or numbered defaults."""
    if spec in (None, ""):
        return imagenet_classes() if num_classes == 1000 else [str(i) for i in range(num_classes)]
    if spec == "imagenet":
        return imagenet_classes()
    if isinstance(spec, str):
        p = Path(spec).expanduser()
        if not p.is_file():
            raise PipelineError(f"class names file '{p}' does not exist (model.class_names).")
        names = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    else:
        names = [str(s) for s in spec]
    if len(names) != num_classes:
        raise PipelineError(f"model.class_names has {len(names)} names but the model has {num_classes} classes.")
    return names


def image_transform(size: int, resize: int | None, mean: tuple[float, ...], std: tuple[float, ...],
                    channels: int = 3) -> Callable[[Image.Image], torch.Tensor]:
    """Resize (shorter side) + centre crop + to tensor + normalise, for RGB PIL input."""
    steps: list[Callable] = []
    if channels == 1:
        steps.append(T.Grayscale(1))
    steps += [T.Resize(resize or size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
              T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)
