"""Unit projections for stage=visualize: what in a channel's top images made its strongest unit fire.

Two projections, each a cached picture per (channel, image) beside its receptive-field patch:

* ``deconvnet`` (Zeiler & Fergus 2014, :mod:`pipeline.methods.deconvnet`): the backward pass with
  ReLU applied to the signal. It reads the image only through max-pooling's switches, so on a
  network without max-pool layers it draws the same pattern for every image: the layers' filters
  spread on their stride grid, a checkerboard.
* ``guided_backprop`` (Springenberg et al. 2015, :func:`pipeline.methods.guided.guided_projection`):
  the same backward pass, gated also by the forward's ReLU masks, so it depends on the image.

``visualize.projection=auto`` draws both where max-pool layers run before the layer, guided backprop
alone otherwise. For each method, :func:`summarize` scores how much its projections depend on the
image (the mean Spearman between different top images' projections, aligned on the unit) and flags
it above ``visualize.input_dependence.max_spearman``, with the reason; projections whose power sits
on the layer's stride grid are noted (:mod:`pipeline.methods.dependence`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pipeline.artifacts import OVERLAY_FILE, PATCH_FILE, Artifact, artifact_key, read_artifact, write_picture
from pipeline.errors import PipelineError
from pipeline.methods.deconvnet import DeconvResult, NotAChain, deconvnet, deconvnet_explicit, max_pools_before
from pipeline.methods.dependence import aligned_dependence, stride_grid_share, unit_centre
from pipeline.methods.guided import guided_projection
from pipeline.methods.receptive import receptive_field, unit_box
from pipeline.models import ModelBundle
from pipeline.data.images import images_to_tensor
from pipeline.pictures import grid, load_png, safe_name, save_png, side_by_side, signed_patch, unnormalize
from pipeline.runtime import Context

PROJECTIONS = ("auto", "deconvnet", "guided_backprop", "both")
KIND = {"deconvnet": "deconv", "guided_backprop": "guided"}     # index kind and artifact method
TITLE = {"deconvnet": "deconvnet", "guided_backprop": "guided backprop"}
VERSION = {"deconvnet": 1, "guided_backprop": 1}
DECONV_MODES = ("auto", "explicit", "hooked")


def resolve_projections(model: ModelBundle, layer: str, spec: str) -> tuple[list[str], list[str], str]:
    """The projection methods to draw, the max-pool layers before ``layer`` and why that choice."""
    if spec not in PROJECTIONS:
        raise PipelineError(f"visualize.projection={spec!r} is not one of {', '.join(PROJECTIONS)}.")
    ref = next(model.module.parameters())
    pools = max_pools_before(model.module, torch.zeros(1, *model.input_shape, device=ref.device), layer)
    if spec != "auto":
        return (["deconvnet", "guided_backprop"] if spec == "both" else [spec]), pools, "configured"
    if pools:
        return ["deconvnet", "guided_backprop"], pools, f"max-pool switches before {layer}: {', '.join(pools)}"
    return ["guided_backprop"], pools, (
        f"{model.name} has no max-pool layer before {layer}, so its deconvnet projections would not depend "
        "on the image; guided backprop only (visualize.projection=both draws the deconvnet too)")


def resolve_deconv_mode(model: ModelBundle, layer: str, mode: str) -> tuple[str, str]:
    """``explicit`` or ``hooked`` and why: auto tries the explicit deconvnet on a probe input and
    takes the hooked one when the network is not a conv/ReLU/max-pool chain."""
    if mode not in DECONV_MODES:
        raise PipelineError(f"visualize.deconv.mode={mode!r} is not one of {', '.join(DECONV_MODES)}.")
    if mode == "hooked":
        return "hooked", "configured"
    ref = next(model.module.parameters())
    try:
        deconvnet_explicit(model.module, torch.zeros(1, *model.input_shape, device=ref.device), layer, 0)
    except NotAChain as e:
        if mode == "explicit":
            raise PipelineError(f"visualize.deconv.mode=explicit cannot handle {model.name} up to {layer!r}: "
                                f"{str(e).split(';')[0]}. Set visualize.deconv.mode=hooked (the hooked "
                                f"backward pass handles BatchNorm, residual blocks and any other layer) or "
                                f"mode=auto.") from None
        return "hooked", str(e).split(";")[0]
    return "explicit", "conv/ReLU/max-pool chain" if mode == "auto" else "configured"


@dataclass
class Job:
    """One projection to compute: ``method`` for channel ``channel`` of the layer on one image."""

    method: str
    channel: int
    rank: int
    image_id: str
    path: str
    key: str


def projection_function(method: str, mode: str) -> Callable[..., DeconvResult]:
    """The batched projection behind ``method`` (the deconvnet in its resolved mode)."""
    if method == "guided_backprop":
        return guided_projection
    return deconvnet_explicit if mode == "explicit" else deconvnet


def projection_params(ctx: Context, layer: str, mode: str) -> dict[str, dict[str, Any]]:
    """Each method's settings that enter its projections' cache keys (from ``visualize.deconv``)."""
    cfg = ctx.cfg.visualize
    common = {"layer": layer, "scale_by_activation": bool(cfg.deconv.scale_by_activation),
              "patch_min_size": int(cfg.deconv.patch_min_size)}
    return {"deconvnet": {"layer": layer, "mode": mode, **common}, "guided_backprop": common}


def projection_jobs(ctx: Context, method: str, params: dict[str, Any], channel: int, top: pd.DataFrame) -> list[Job]:
    """The projections of ``channel`` on its top images (``top``: image_id, path, best first), each
    with its cache key (method, version, settings, channel, model key, image id)."""
    key = ctx.model.key
    return [Job(method, channel, r, str(t.image_id), str(t.path),
                artifact_key(KIND[method], VERSION[method], {**params, "channel": channel}, key, str(t.image_id)))
            for r, t in enumerate(top.itertuples(index=False))]


def compute(ctx: Context, layer: str, hw: tuple[int, int], jobs: list[Job], fn: Callable[..., DeconvResult],
            field: tuple[int, int], params: dict[str, Any]) -> dict[str, Artifact]:
    """Run one projection method on the jobs' images in batches and write one artifact per job;
    returns them by key."""
    model = ctx.model
    cfg = ctx.cfg.visualize
    _, h, w = model.input_shape
    bs = max(1, int(cfg.batch_size))
    written: dict[str, Artifact] = {}
    for s in tqdm(range(0, len(jobs), bs), desc=KIND[jobs[0].method] if jobs else "projections", unit="batch",
                  disable=None if ctx.progress else True):
        batch = jobs[s:s + bs]
        x = images_to_tensor([j.path for j in batch], model.transform)
        res = fn(model.module, x.to(ctx.device), layer, [j.channel for j in batch],
                 scale_by_activation=bool(cfg.deconv.scale_by_activation))
        for i, job in enumerate(batch):
            y, xx = (int(v) for v in res.position[i])
            box = unit_box(y * hw[1] + xx, hw, (h, w), field)
            proj = res.projection[i].detach().cpu()
            shown, patch = signed_patch(proj, unnormalize(x[i], model.mean, model.std), box,
                                        int(cfg.deconv.patch_min_size))
            meta = {"layer": layer, "channel": job.channel, "image_id": job.image_id, "path": job.path,
                    "position": [y, xx], "value": float(res.value[i]), "box": list(box),
                    "field": list(field), "params": params}
            written[job.key] = write_picture(ctx.cache, KIND[job.method], job.key, proj.numpy(), shown, meta, patch)
    return written


def channel_projections(ctx: Context, layer: str, hw: tuple[int, int], tops: dict[int, pd.DataFrame],
                        methods: list[str], mode: str, pools: list[str], out_dir: Path
                        ) -> tuple[list[dict[str, Any]], list[int] | None, dict[str, dict[str, Any]]]:
    """Every method's projections of each channel's top images (``tops``: image_id, path per
    channel, best first): cached artifacts, one grid per method and channel beside the patches,
    index rows, the receptive field used (None when nothing was computed or read), and the
    per-method summary of :func:`summarize`."""
    cfg = ctx.cfg.visualize
    model = ctx.model
    params = projection_params(ctx, layer, mode)
    jobs = {m: {c: projection_jobs(ctx, m, params[m], c, top) for c, top in tops.items()} for m in methods}
    field: tuple[int, int] | None = None
    fresh: set[str] = set()
    arts: dict[str, Artifact] = {}
    for m in methods:
        found = {j.key: read_artifact(ctx.cache, KIND[m], j.key) for js in jobs[m].values() for j in js}
        arts.update({k: a for k, a in found.items() if a is not None})
        missing = [j for js in jobs[m].values() for j in js if found[j.key] is None]
        if missing:
            field = field or receptive_field(model.module, layer, model.input_shape)
            arts.update(compute(ctx, layer, hw, missing, projection_function(m, mode), field, params[m]))
            fresh |= {j.key for j in missing}
    rows: list[dict[str, Any]] = []
    summary: dict[str, dict[str, Any]] = {}
    stride = (model.input_shape[1] // hw[0], model.input_shape[2] // hw[1])
    for m in methods:
        scores: dict[int, float] = {}
        shares: list[float] = []
        for c, js in jobs[m].items():
            if not js:
                continue
            shown = [arts[j.key] for j in js]
            field = field or (int(shown[0].meta["field"][0]), int(shown[0].meta["field"][1]))
            maps = [torch.from_numpy(a.map) for a in shown]
            centres = [unit_centre(a.meta["position"], hw, model.input_shape[1:]) for a in shown]
            scores[c] = aligned_dependence(maps, centres, field, int(cfg.input_dependence.min_pixels))
            side = math.ceil(math.sqrt(len(js)))
            pair = side_by_side(grid([load_png(a.folder / OVERLAY_FILE) for a in shown], side),
                                grid([load_png(a.folder / PATCH_FILE) for a in shown], side))
            path = out_dir / f"{KIND[m]}__{safe_name(layer)}__c{c}.png"
            save_png(pair, path)
            for j, a, raw in zip(js, shown, maps):
                share = stride_grid_share(raw, stride)
                shares.append(share)
                rows.append({"kind": KIND[m], "layer": layer, "channel": c, "image_id": j.image_id, "rank": j.rank,
                             "value": a.meta["value"], "png": str((a.folder / OVERLAY_FILE).resolve()),
                             "patch_png": str((a.folder / PATCH_FILE).resolve()), "grid": str(path.resolve()),
                             "key": j.key, "cached": j.key not in fresh, "input_dependence": scores[c],
                             "grid_share": share})
        summary[m] = summarize(m, scores, shares, stride, model.name, layer, pools,
                               float(cfg.input_dependence.max_spearman), float(cfg.grid_limit))
    return rows, list(field) if field else None, summary


def summarize(method: str, scores: dict[int, float], shares: list[float], stride: tuple[int, int], model: str,
              layer: str, pools: list[str], limit: float, grid_limit: float) -> dict[str, Any]:
    """One method's input dependence (mean over channels of the per-channel score), whether it is
    flagged and why, and how many of its projections the stride grid dominates."""
    finite = [v for v in scores.values() if math.isfinite(v)]
    value = float(np.mean(finite)) if finite else math.nan
    flagged = bool(finite) and value > limit
    if not finite:
        reason = "fewer than two top images with a projection per channel: no input-dependence score"
    elif flagged and method == "deconvnet" and not pools:
        reason = (f"{model} has no max-pool switches before {layer}: deconvnet projections do not depend on "
                  f"the image (different images' projections correlate {value:.2f} > {limit})")
    elif flagged:
        reason = (f"{TITLE[method]} projections of different images correlate {value:.2f} (> {limit}): they show "
                  "the network more than the image")
    else:
        reason = ""
    gridded = sum(1 for v in shares if math.isfinite(v) and v > grid_limit)
    grid_note = (f"{gridded} of {len(shares)} {TITLE[method]} projections have more than {grid_limit:.0%} of their "
                 f"power on the {stride[0]}x{stride[1]}-pixel stride grid of {layer}: that checkerboard is drawn by "
                 "the transposed strided convolutions, not by the image") if gridded else ""
    return {"method": method, "title": TITLE[method], "input_dependence": value,
            "per_channel": {str(c): v for c, v in scores.items()}, "max_spearman": limit, "flagged": flagged,
            "reason": reason, "grid_limit": grid_limit, "stride": list(stride), "grid_dominated": gridded,
            "projections": len(shares), "grid_note": grid_note}
