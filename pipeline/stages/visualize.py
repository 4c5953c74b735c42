"""stage=visualize: what a layer's channels and the model's classes look for.

For one layer and a few of its channels (a list, a range, or the n most active) this writes

* the gradient-ascent picture of each channel (``render`` with ``channel(layer, c)``, all channels
  in one batched, seeded call that runs the network only up to the layer);
* projections of each channel's top dataset images (from the activation store, or from a forward
  pass over a sample when the store lacks the layer), each beside its image patch: the receptive
  field around the channel's strongest unit, as in Zeiler & Fergus's Fig. 2. The deconvnet and
  guided backprop, with a score per method of how much its projections depend on the image
  (:mod:`pipeline.projections`; ``visualize/projections.json``);
* the gradient-ascent picture of classes (every class of a small model such as the digits CNN, or
  the configured class names), with the model's confidence that the picture shows that class.

Each picture is a cached artifact (``cache/artifacts/{ascent,class_ascent,deconv,guided}/..``, keyed
by method, version, parameters, model key and, for projections, the image id), so a re-run reads them
back. The run folder gets the grids and ``visualize/index.parquet`` (one row per picture) for the
report stage.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import ListConfig

from pipeline.ascent_pictures import channel_objectives, render_cached
from pipeline.cache import atomic_write_json
from pipeline.data.loader import record_loader
from pipeline.errors import PipelineError, suggest
from pipeline.methods.activations import channel_stats
from pipeline.methods.ascent import class_objective
from pipeline.methods.hooks import truncated_forward
from pipeline.models import ModelBundle
from pipeline.projections import channel_projections, resolve_deconv_mode, resolve_projections
from pipeline.runtime import Context
from pipeline.settings import plain
from pipeline.selection import class_index
from pipeline.pictures import grid, load_png, safe_name, save_png

log = logging.getLogger(__name__)

PROJECTIONS_FILE = "projections.json"


# ------------------------------------------------------------------------------ selection ---

def layer_output_shape(model: ModelBundle, layer: str) -> tuple[int, ...]:
    """Shape of ``layer``'s output for one input image (without the batch), by a truncated forward."""
    ref = next(model.module.parameters())
    with torch.no_grad():
        out = truncated_forward(model.module, torch.zeros(1, *model.input_shape, device=ref.device), [layer])
    return tuple(out[layer].shape[1:])


def resolve_layer(ctx: Context, spec: Any) -> tuple[str, tuple[int, int, int]]:
    """The layer to visualise and its (C, H, W) output shape.

    ``None`` takes the last of the model's default layers with a channel map (the last conv block).
    A name must be one module of ``model.named_modules()`` whose output is a (B, C, H, W) map.
    """
    model = ctx.model
    if spec is None:
        candidates = ctx.layers()
        for name in reversed(candidates):
            shape = layer_output_shape(model, name)
            if len(shape) == 3:
                return name, shape  # type: ignore[return-value]
        raise PipelineError(f"none of {model.name}'s default layers ({', '.join(candidates)}) has a channel "
                            "map; set visualize.layer to a convolutional layer.")
    if not isinstance(spec, str):
        raise PipelineError(f"visualize.layer must be one layer name, got {spec!r}.")
    names = [n for n, _ in model.module.named_modules() if n]
    if spec not in names:
        defaults = ", ".join(ctx.layers())
        raise PipelineError(f"unknown layer {spec!r} in model {model.name}.{suggest(spec, names)} Layers with "
                            f"channel maps include: {defaults}. List them all with "
                            f"`python -m pipeline stage=layers model={ctx.cfg.model.name}`.")
    shape = layer_output_shape(model, spec)
    if len(shape) != 3:
        convs = [n for n, m in model.module.named_modules() if isinstance(m, torch.nn.Conv2d)]
        raise PipelineError(f"layer {spec!r} outputs shape {shape} per image, not a (C, H, W) channel map; "
                            f"pick a convolutional layer, e.g. {', '.join(convs[-6:])}.")
    return spec, shape  # type: ignore[return-value]


_RANGE = re.compile(r"^\s*(-?\d*)\s*:\s*(-?\d*)\s*(?::\s*(-?\d*)\s*)?$")


def parse_channels(spec: Any, n_channels: int, layer: str) -> list[int] | None:
    """Channels from a list, a range string ``"a:b"`` / ``"a:b:step"`` (end excluded), an int, or a
    comma list ``"1,4,7"``; ``None`` means "the most active" (returns None). Checks the range."""
    if spec is None:
        return None
    valid = f"layer {layer!r} has {n_channels} channels: use 0..{n_channels - 1}"
    if isinstance(spec, (ListConfig, list, tuple)):
        items = list(spec)
    elif isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        items = [int(spec)]
    elif isinstance(spec, str) and _RANGE.match(spec):
        start, stop, step = (int(v) if v not in (None, "") else None for v in _RANGE.match(spec).groups())
        if step == 0:
            raise PipelineError(f"visualize.channels={spec!r}: a range step cannot be 0.")
        if (start is not None and not 0 <= start < n_channels) or (stop is not None and not 0 <= stop <= n_channels):
            raise PipelineError(f"visualize.channels={spec!r} is out of range: {valid} (a range a:b ends "
                                f"before b, so b can be at most {n_channels}).")
        items = list(range(n_channels))[slice(start, stop, step)]
        if not items:
            raise PipelineError(f"visualize.channels={spec!r} selects no channel; {valid}.")
    elif isinstance(spec, str) and re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", spec):
        items = [int(v) for v in spec.split(",")]
    else:
        raise PipelineError(f"visualize.channels={spec!r} is not a channel list ([0, 5]), a range ('0:8'), "
                            f"a channel number or null (the most active).")
    out: list[int] = []
    for c in items:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
            raise PipelineError(f"visualize.channels: {c!r} is not a channel number; {valid}.")
        if not 0 <= int(c) < n_channels:
            raise PipelineError(f"channel {c} is out of range: {valid}.")
        if int(c) not in out:
            out.append(int(c))
    if not out:
        raise PipelineError(f"visualize.channels is empty; give channels or null for the most active ({valid}).")
    return out


def resolve_classes(spec: Any, class_names: Sequence[str], all_up_to: int) -> list[int]:
    """Class indices to visualise: every class of a model with at most ``all_up_to`` classes, else
    ``spec`` (names, case-insensitive, or indices), with a clear error for an unknown name."""
    n = len(class_names)
    if n <= all_up_to:
        return list(range(n))
    out: list[int] = []
    for item in list(spec or []):
        k = class_index(item, class_names, "visualize.classes")
        if k not in out:
            out.append(k)
    return out


# ------------------------------------------------------------------- channel statistics ---

@dataclass
class LayerStats:
    """Where the channel statistics come from and the per-channel mean activation over the images."""

    source: str            # "store" or "sample"
    n_images: int
    channel_means: np.ndarray | None      # None when the channels are configured (not needed)
    sample: pd.DataFrame | None = None      # sample mode: image_id, path, label (one row per image)
    sample_max: np.ndarray | None = None    # sample mode: (N, C) spatial max
    sample_argmax: np.ndarray | None = None  # sample mode: (N, C) flat argmax (y * W + x)


def store_for(ctx: Context, layer: str) -> Any:
    """The activation store when it holds ``layer``, else None (with the reason logged)."""
    try:
        store = ctx.store()
    except PipelineError as e:
        log.warning("visualize: %s Using a forward pass over a sample of the dataset instead.", e)
        return None
    if layer not in store.layers():
        log.warning("visualize: the activation store has no layer %r (it has %s); using a forward pass over a "
                    "sample of the dataset instead (add it with stage=extract extract.layers=[...]).",
                    layer, ", ".join(store.layers()) or "none")
        return None
    return store


def sample_stats(ctx: Context, layer: str, n: int) -> LayerStats:
    """Channel statistics from a forward pass (up to ``layer``) over ``n`` dataset images, drawn
    with the run's seed from the records sorted by image id (the same sample on every run)."""
    records = (ctx.dataset.records.sort_values(["image_id", "path"], kind="stable")
               .drop_duplicates("image_id").reset_index(drop=True))
    if len(records) == 0:
        raise PipelineError("the dataset has no images to visualise channels with.")
    if len(records) > n:
        records = records.sample(n=n, random_state=int(ctx.cfg.seed)).reset_index(drop=True)
    model = ctx.model
    maxes, means, argmaxes = [], [], []
    with torch.no_grad():
        for x, _ in record_loader(records, model.transform, int(ctx.cfg.visualize.batch_size)):
            act = truncated_forward(model.module, x.to(ctx.device), [layer])[layer]
            mx, mean, arg, _ = channel_stats(act)
            maxes.append(mx.cpu())
            means.append(mean.cpu())
            argmaxes.append(arg.cpu())
    mean_all = torch.cat(means).double().mean(0).numpy()
    return LayerStats("sample", len(records), mean_all, records[["image_id", "path", "label"]],
                      torch.cat(maxes).numpy(), torch.cat(argmaxes).numpy().astype(np.int64))


def top_images(stats: LayerStats, store: Any, layer: str, c: int, k: int, hw: tuple[int, int]) -> pd.DataFrame:
    """The (at most) ``k`` images whose spatial max of channel ``c`` is highest: image_id, path,
    value, y, x. Images on which the channel's strongest unit is not positive are left out: the
    channel does not fire there, so there is nothing to project."""
    if store is not None:
        df = store.topk(layer, c, k, by="max")[["image_id", "path", "value", "y", "x"]]
    else:
        assert stats.sample is not None and stats.sample_max is not None and stats.sample_argmax is not None
        order = np.argsort(-stats.sample_max[:, c], kind="stable")[:k]
        df = stats.sample.iloc[order][["image_id", "path"]].reset_index(drop=True)
        df["value"] = stats.sample_max[order, c]
        df["y"], df["x"] = stats.sample_argmax[order, c] // hw[1], stats.sample_argmax[order, c] % hw[1]
    return df[df["value"] > 0].reset_index(drop=True)


# ------------------------------------------------------------------------------------ run ---

def run(ctx: Context) -> dict[str, Any]:
    """Write the ascent, projection and class pictures (cached), their grids, the index table and
    the projections' input-dependence summary.

    Everything the user set is checked before any work: layer, channels, projections, deconv mode,
    classes.
    """
    cfg = ctx.cfg.visualize
    model = ctx.model
    model.module.eval()
    layer, (n_channels, lh, lw) = resolve_layer(ctx, cfg.layer)
    chosen = parse_channels(plain(cfg.channels), n_channels, layer)
    methods, pools, projection_why = resolve_projections(model, layer, str(cfg.projection))
    mode, why = (resolve_deconv_mode(model, layer, str(cfg.deconv.mode)) if "deconvnet" in methods
                 else ("", "not drawn"))
    classes = resolve_classes(plain(cfg.classes), model.class_names, int(cfg.all_classes_up_to))
    if int(cfg.top) < 1:
        raise PipelineError(f"visualize.top must be at least 1, got {cfg.top}.")
    out_dir = ctx.run_dir / "visualize"
    out_dir.mkdir(parents=True, exist_ok=True)

    store = store_for(ctx, layer)
    if store is None:
        stats = sample_stats(ctx, layer, int(cfg.sample))
    elif chosen is None:
        means, n_rows = store.channel_means(layer)
        stats = LayerStats("store", n_rows, means)
    else:
        stats = LayerStats("store", int(store.manifest["n_images"]), None)
    if chosen is None:
        assert stats.channel_means is not None
        n = max(1, min(int(cfg.n_most_active), n_channels))
        chosen = [int(c) for c in np.argsort(-stats.channel_means, kind="stable")[:n]]
        selection = f"{n} most active by mean activation over {stats.n_images} images ({stats.source})"
    else:
        selection = "configured"
    log.info("visualize: layer %s, channels %s (%s); projections %s (%s)%s", layer, chosen, selection,
             ", ".join(methods), projection_why, f"; deconvnet {mode} ({why})" if mode else "")
    result: dict[str, Any] = {"layer": layer, "channels": chosen, "selection": selection, "source": stats.source,
                              "projection": methods, "projection_note": projection_why, "deconv_mode": mode or None}

    rows = channel_ascent(ctx, layer, chosen, out_dir)
    tops = {c: top_images(stats, store, layer, c, int(cfg.top), (lh, lw)) for c in chosen}
    projection_rows, field, summary = channel_projections(ctx, layer, (lh, lw), tops, methods, mode, pools, out_dir)
    rows += projection_rows
    atomic_write_json(out_dir / PROJECTIONS_FILE, {"layer": layer, "max_pools": pools, "note": projection_why,
                                                   "methods": summary})
    for entry in summary.values():
        for text in (entry["reason"] if entry["flagged"] else "", entry["grid_note"]):
            if text:
                log.warning("visualize: %s", text)
    result.update({"deconv_images": sum(r["kind"] == "deconv" for r in projection_rows),
                   "guided_images": sum(r["kind"] == "guided" for r in projection_rows),
                   "receptive_field": field,
                   "input_dependence": {m: round(s["input_dependence"], 4) for m, s in summary.items()},
                   "flagged_projections": [m for m, s in summary.items() if s["flagged"]]})
    if classes:
        class_rows = class_ascent(ctx, classes, out_dir)
        confidence = {r["class_name"]: round(float(r["value"]), 4) for r in class_rows}
        result.update({"classes": len(classes), "class_confidence": confidence,
                       "min_class_confidence": min(confidence.values())})
        rows += class_rows

    index = write_index(rows, out_dir / "index.parquet")
    result.update({"pictures": len(index), "cached": int(index["cached"].sum()),
                   "computed": int((~index["cached"]).sum()), "index": str(out_dir / "index.parquet")})
    return result


def channel_ascent(ctx: Context, layer: str, chosen: list[int], out_dir: Path) -> list[dict[str, Any]]:
    """Gradient-ascent picture of each channel (one batch; objectives as
    :func:`~pipeline.ascent_pictures.channel_objectives` makes them), their grid and index rows."""
    arts = render_cached(ctx, "ascent", *channel_objectives(ctx, layer, chosen))
    path = out_dir / f"ascent__{safe_name(layer)}.png"
    save_png(grid([load_png(a.overlay_path) for a in arts], nrow=min(len(arts), 8)), path)
    return [{"kind": "ascent", "layer": layer, "channel": c, "value": a.meta["objective_value"],
             "png": str(a.overlay_path.resolve()), "grid": str(path.resolve()), "key": a.key,
             "cached": a.cached} for c, a in zip(chosen, arts)]


def class_ascent(ctx: Context, classes: list[int], out_dir: Path) -> list[dict[str, Any]]:
    """Gradient-ascent picture of each class (one batch) with the model's confidence in it."""
    names = ctx.model.class_names
    arts = render_cached(ctx, "class_ascent", [{"class_index": k, "class_name": names[k]} for k in classes],
                         [class_objective(k) for k in classes])
    path = out_dir / "classes.png"
    save_png(grid([load_png(a.overlay_path) for a in arts], nrow=min(len(arts), 10)), path)
    return [{"kind": "class", "class_index": k, "class_name": names[k], "value": a.meta["confidence"],
             "predicted": a.meta["predicted"], "png": str(a.overlay_path.resolve()), "grid": str(path.resolve()),
             "key": a.key,
             "cached": a.cached} for k, a in zip(classes, arts)]


INDEX_COLUMNS = {"kind": "string", "layer": "string", "channel": "Int64", "class_index": "Int64",
                 "class_name": "string", "image_id": "string", "rank": "Int64", "value": "float64",
                 "predicted": "Int64", "png": "string", "patch_png": "string", "grid": "string",
                 "key": "string", "cached": "bool", "input_dependence": "float64", "grid_share": "float64"}


def write_index(rows: list[dict[str, Any]], path: Path) -> pd.DataFrame:
    """The run's table of pictures: kind (ascent/deconv/guided/class), layer, channel or class,
    image_id, rank, value (channel activation, unit activation, or class confidence), png paths,
    cache key; for projections, the channel's input-dependence score and the picture's share of
    power on the stride grid."""
    df = pd.DataFrame(rows, columns=list(INDEX_COLUMNS))
    df = df.astype(INDEX_COLUMNS)
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_parquet(tmp, index=False)
    tmp.replace(path)
    return df
