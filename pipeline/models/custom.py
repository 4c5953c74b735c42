"""The user's own model through Hydra: ``model=custom model._target_=my_pkg.models.make``.

Any callable that returns an ``nn.Module`` is instantiated with ``hydra.utils.instantiate``; the
config's other keys (beyond the ones this source reads) go to it as keyword arguments. The input
size comes from ``model.image_size`` or from what the transform makes, the class count from one probe
forward, and the key from the weights, so the same model built again reuses the cache.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn
from torchvision import transforms as T

from pipeline.errors import PipelineError, suggest
from pipeline.settings import plain
from pipeline.models.common import (ModelBundle, image_transform, input_stats, load_checkpoint, load_state,
                                    read_class_names, weights_key)

#: keys of ``model=custom`` this source reads; every other key is a keyword argument of the callable
OWN_KEYS = frozenset({"name", "source", "_target_", "transform", "weights_path", "image_size", "channels", "resize",
                      "mean", "std", "class_names", "layers", "train"})


def locate(target: Any, what: str) -> Callable[..., Any]:
    """The object a dotted ``_target_`` names, or one line naming what cannot be imported and the
    closest names found where the import stopped."""
    if not target or not isinstance(target, str):
        raise PipelineError(f"{what}: no _target_ given. Set {what}._target_=my_pkg.module.function "
                            "(a callable importable from here).")
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and not module_name.startswith(e.name):
                raise PipelineError(f"{what}._target_={target}: importing '{module_name}' failed: module "
                                    f"'{e.name}' is not installed. Install it or fix the import.")
            continue
        except Exception as e:  # the user's module raised while importing
            raise PipelineError(f"{what}._target_={target}: importing '{module_name}' raised "
                                f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}. Fix that module.")
        for j, name in enumerate(parts[i:], start=i):
            if not hasattr(obj, name):
                where = ".".join(parts[:j])
                choices = [n for n in dir(obj) if not n.startswith("_")]
                raise PipelineError(f"{what}._target_={target}: '{where}' has no '{name}'.{suggest(name, choices)} "
                                    "Point _target_ at a callable importable from here.")
            obj = getattr(obj, name)
        if not callable(obj):
            raise PipelineError(f"{what}._target_={target} is a {type(obj).__name__}, not a callable.")
        return obj
    raise PipelineError(f"{what}._target_={target}: no module '{parts[0]}' can be imported. Give the full dotted "
                        "path (my_pkg.module.function) of a module on the Python path.")


def instantiate(target: str, kwargs: dict[str, Any], what: str) -> Any:
    """``hydra.utils.instantiate`` of ``target`` with ``kwargs``, its errors as one line."""
    import hydra

    locate(target, what)
    try:
        return hydra.utils.instantiate(OmegaConf.create({"_target_": target, **kwargs}), _convert_="all")
    except Exception as e:
        cause = e.__cause__ or e
        raise PipelineError(f"{what}._target_={target} raised {type(cause).__name__}: "
                            f"{str(cause).strip().splitlines()[0][:200]}. Check its keyword arguments "
                            f"({', '.join(kwargs) or 'none given'}).")


def _normalize_stats(transform: Callable) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """mean and std of the transform's Normalize step, when it is a Compose that has one."""
    steps = getattr(transform, "transforms", [transform])
    for step in steps:
        if isinstance(step, T.Normalize):
            return tuple(float(v) for v in step.mean), tuple(float(v) for v in step.std)
    return None


def _transform_shape(transform: Callable) -> tuple[int, int, int]:
    """(C, H, W) of what the transform makes from an RGB image."""
    try:
        x = transform(Image.new("RGB", (256, 256), (128, 128, 128)))
    except Exception as e:
        raise PipelineError(f"model.transform does not run on an RGB PIL image ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:200]}). It must map a PIL image to a (C, H, W) tensor.")
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        raise PipelineError(f"model.transform returns {type(x).__name__} "
                            f"{tuple(x.shape) if isinstance(x, torch.Tensor) else ''}, not a (C, H, W) tensor.")
    return int(x.shape[0]), int(x.shape[1]), int(x.shape[2])


def build_custom(cfg: Any) -> ModelBundle:
    """The model ``model._target_`` returns, with its transform, input shape, stats and class names."""
    target = cfg.get("_target_")
    kwargs = {k: v for k, v in plain(cfg).items() if k not in OWN_KEYS}
    module = instantiate(target, kwargs, "model")
    if not isinstance(module, nn.Module):
        raise PipelineError(f"model._target_={target} returned a {type(module).__name__}, not a torch.nn.Module. "
                            "Point it at a function or class that returns the model.")
    if cfg.get("weights_path"):
        load_state(module, load_checkpoint(cfg.weights_path, f"model=custom {target}"), f"model={target}")
    tcfg = cfg.get("transform")
    if tcfg:
        transform = instantiate(tcfg.get("_target_"), {k: v for k, v in plain(tcfg)
                                                       .items() if k != "_target_"}, "model.transform")
        channels, h, w = _transform_shape(transform)
        if cfg.get("image_size") and int(cfg.image_size) not in (h, w):
            raise PipelineError(f"model.image_size={cfg.image_size} but model.transform makes {h}x{w} inputs. "
                                "Leave model.image_size null or make them agree.")
        mean, std = (tuple(cfg.mean), tuple(cfg.std)) if cfg.get("mean") and cfg.get("std") else (
            _normalize_stats(transform) or input_stats(cfg, channels))
    else:
        channels = int(cfg.get("channels") or 3)
        h = w = int(cfg.get("image_size") or 224)
        mean, std = input_stats(cfg, channels)
        transform = image_transform(h, cfg.get("resize") or h, mean, std, channels)
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, channels, h, w))
    except Exception as e:
        raise PipelineError(f"model._target_={target} does not run on a (1, {channels}, {h}, {w}) input "
                            f"({type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}). Set model.channels and "
                            "model.image_size (or model.transform) to the input the model was made for.")
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise PipelineError(f"model._target_={target} returns {type(out).__name__} "
                            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}, not (batch, classes) "
                            "logits. Return the logits tensor from forward.")
    for m in module.modules():  # hooks and deconvnet need to see every activation
        if isinstance(m, nn.ReLU):
            m.inplace = False
    name = str(cfg.get("name") or "custom")
    if name == "custom":
        name = str(target).rsplit(".", 1)[-1]
    return ModelBundle(name, module, transform, read_class_names(cfg.get("class_names"), int(out.shape[1])),
                       weights_key(module, f"custom:{target}"), (channels, h, w), mean, std,
                       list(cfg.get("layers") or []) or None, {"target": target})
