"""Gradient-ascent pictures as cached artifacts, shared by stage=visualize and the report's model
browser: both key a channel's picture the same way (method, version, ``visualize.ascent`` settings,
layer, channel, objective layer, model key), so a picture rendered by one is read back by the other.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from pipeline.artifacts import Artifact, artifact_key, read_artifact, write_picture
from pipeline.methods.ascent import Objective, channel, objective_values, render
from pipeline.models import ModelBundle
from pipeline.runtime import Context

log = logging.getLogger(__name__)

ASCENT_VERSION = 1
ACTIVATIONS = (torch.nn.ReLU, torch.nn.ReLU6)


def pre_activation(module: torch.nn.Module, layer: str) -> str:
    """The layer whose output is the input of ``layer``'s final ReLU/ReLU6, where the module
    structure shows it: a ReLU that follows a sibling in a Sequential (digits' ``features.relu4``
    -> ``features.conv4``), or a Sequential that ends in one (EfficientNet's ``head`` ->
    ``head.bn``); otherwise ``layer`` itself (e.g. a residual block's sum)."""
    modules = dict(module.named_modules())
    m = modules[layer]
    prefix = f"{layer}." if layer else ""
    if isinstance(m, torch.nn.Sequential) and len(m) > 0:
        last = [n for n, _ in m.named_children()][-1]
        inner = pre_activation(module, prefix + last)
        if inner != prefix + last:
            return inner
    if isinstance(m, ACTIVATIONS) and layer:
        parent, _, child = layer.rpartition(".")
        if isinstance(modules[parent], torch.nn.Sequential):
            names = [n for n, _ in modules[parent].named_children()]
            i = names.index(child)
            if i > 0:
                return f"{parent}.{names[i - 1]}" if parent else names[i - 1]
    return layer


def ascent_params(cfg: DictConfig, model: ModelBundle) -> dict[str, Any]:
    """The render keyword arguments from ``visualize.ascent`` (all of them change the picture)."""
    a = cfg.ascent
    return {"steps": int(a.steps), "lr": float(a.lr), "param": str(a.param), "decorrelate": bool(a.decorrelate),
            "transforms": None if bool(a.transforms) else [], "l2": float(a.l2), "tv": float(a.tv),
            "blur_every": int(a.blur_every), "blur_sigma": float(a.blur_sigma), "seed": int(a.seed),
            "mean": list(model.mean), "std": list(model.std)}


def key_params(params: dict[str, Any], model: ModelBundle) -> dict[str, Any]:
    """The render settings as they enter the cache key (the transforms by name, the input shape)."""
    return {**params, "transforms": "standard" if params["transforms"] is None else "none",
            "shape": list(model.input_shape)}


def ascent_keys(ctx: Context, method: str, names: list[dict[str, Any]]) -> list[str]:
    """Cache keys of the ascent pictures named by ``names`` (what each picture is of)."""
    model = ctx.model
    shared = key_params(ascent_params(ctx.cfg.visualize, model), model)
    return [artifact_key(method, ASCENT_VERSION, {**shared, **n}, model.key, "") for n in names]


def channel_objectives(ctx: Context, layer: str, channels: list[int]) -> tuple[list[dict[str, Any]], list[Objective]]:
    """What each channel's picture is of (its key's names) and its objective.

    With ``visualize.ascent.pre_relu`` the objective is the channel before the layer's final
    ReLU/ReLU6 (as Lucid's ``*_pre_relu`` layers): a ReLU channel that is zero on the starting image
    has no gradient to climb, and ReLU6 stops rewarding the channel at 6."""
    target = pre_activation(ctx.model.module, layer) if bool(ctx.cfg.visualize.ascent.pre_relu) else layer
    return ([{"layer": layer, "channel": c, "objective_layer": target} for c in channels],
            [channel(target, c) for c in channels])


def render_cached(ctx: Context, method: str, names: list[dict[str, Any]], objectives: list[Objective],
                  ) -> list[Artifact]:
    """Ascent pictures for ``objectives`` (one cached artifact each, keyed by ``names[i]``); the
    missing ones are rendered together in one batch."""
    model = ctx.model
    params = ascent_params(ctx.cfg.visualize, model)
    keys = ascent_keys(ctx, method, names)
    arts: list[Artifact | None] = [read_artifact(ctx.cache, method, k) for k in keys]
    todo = [i for i, a in enumerate(arts) if a is None]
    if todo:
        log.info("rendering %d %s picture(s), %d steps", len(todo), method, params["steps"])
        pictures = render(model.module, [objectives[i] for i in todo], model.input_shape, **params,
                          progress=ctx.progress).cpu()
        values = objective_values(model.module, [objectives[i] for i in todo], pictures.to(ctx.device),
                                  mean=model.mean, std=model.std).cpu()
        extra = class_confidences(model, pictures, [names[i].get("class_index") for i in todo])
        for j, i in enumerate(todo):
            meta = {**names[i], "objective": objectives[i].name, "objective_value": float(values[j]),
                    "params": key_params(params, model), **extra[j]}
            arts[i] = write_picture(ctx.cache, method, keys[i], pictures[j].numpy(), pictures[j], meta)
    return [a for a in arts if a is not None]


def class_confidences(model: ModelBundle, pictures: torch.Tensor, classes: list[int | None]) -> list[dict[str, Any]]:
    """For class pictures: the model's softmax probability of the class and its predicted class."""
    if all(k is None for k in classes):
        return [{} for _ in classes]
    ref = next(model.module.parameters())
    m = torch.as_tensor(model.mean, dtype=torch.float32, device=ref.device).view(1, -1, 1, 1)
    s = torch.as_tensor(model.std, dtype=torch.float32, device=ref.device).view(1, -1, 1, 1)
    with torch.no_grad():
        probs = model.module((pictures.to(ref.device) - m) / s).softmax(1).cpu()
    out = []
    for p, k in zip(probs, classes):
        pred = int(p.argmax())
        out.append({} if k is None else {"confidence": float(p[k]), "predicted": pred,
                                         "predicted_name": model.class_names[pred]})
    return out
