"""stage=query: top-k images of a neuron, images along a direction, nearest neighbours of an image,
or the top neurons of one image. Prints the table, saves it, and saves a PNG grid of the images
and of receptive-field crops around each activation's argmax (Zeiler & Fergus's top-9 patches)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from pipeline.errors import PipelineError
from pipeline.methods.receptive import receptive_field, unit_box
from pipeline.runtime import Context, images_to_tensor, model_view

QUERY_TYPES = ("topk", "direction", "neighbours", "neurons")
CROP_SIZE = 64


def _direction_vector(ctx: Context, store: Any, layer: str) -> tuple[np.ndarray, str]:
    """The query's direction: an explicit vector, or mean of class A minus mean of class B."""
    cfg = ctx.cfg.query
    if cfg.vector is not None:
        return np.asarray(list(cfg.vector), dtype=np.float64), "vector"
    if cfg.class_a is None or cfg.class_b is None:
        raise PipelineError("query.type=direction needs query.vector=[...] or query.class_a and query.class_b.")
    names = ctx.model.class_names
    idx = []
    for c in (cfg.class_a, cfg.class_b):
        if isinstance(c, int) or str(c).isdigit() and str(c) not in names:
            idx.append(int(c))
        elif str(c) in names:
            idx.append(names.index(str(c)))
        else:
            from pipeline.errors import suggest
            raise PipelineError(f"unknown class {c!r}.{suggest(str(c), names)}")
    return store.class_direction(layer, idx[0], idx[1]), f"class {idx[0]} - class {idx[1]}"


def run_query(ctx: Context) -> tuple[pd.DataFrame, str, str]:
    """Answer the configured query; returns (table, layer, description)."""
    cfg = ctx.cfg.query
    kind = str(cfg.type)
    if kind not in QUERY_TYPES:
        raise PipelineError(f"unknown query.type '{kind}': use one of {', '.join(QUERY_TYPES)}.")
    store = ctx.store()
    layer = str(cfg.layer) if cfg.layer else store.layers()[-1]
    k = int(cfg.k)
    if kind == "topk":
        return store.topk(layer, int(cfg.channel), k, by=str(cfg.by)), layer, f"top-{k} of {layer}[{cfg.channel}]"
    if kind == "neurons":
        if not cfg.image:
            raise PipelineError("query.type=neurons needs query.image=<image id or path>.")
        return store.top_neurons(layer, str(cfg.image), k, by=str(cfg.by)), layer, f"top neurons of {cfg.image}"
    exact = not bool(cfg.approximate)
    if kind == "direction":
        vector, what = _direction_vector(ctx, store, layer)
        return store.direction(layer, vector, k, exact=exact), layer, f"along {what} in {layer}"
    if not cfg.image:
        raise PipelineError("query.type=neighbours needs query.image=<image id or path>.")
    return store.neighbours(layer, str(cfg.image), k, exact=exact), layer, f"neighbours of {cfg.image} in {layer}"


def crops(ctx: Context, images: torch.Tensor, layer: str, ys: np.ndarray, xs: np.ndarray,
          hw: tuple[int, int]) -> torch.Tensor:
    """Receptive-field crops around each (y, x) unit of ``layer``, resized to CROP_SIZE."""
    model = ctx.model
    field = receptive_field(model.module, layer, model.input_shape)
    out = []
    for img, y, x in zip(images, ys, xs):
        x0, y0, x1, y1 = unit_box(int(y) * hw[1] + int(x), hw, img.shape[-2:], field)
        out.append(F.interpolate(img[None, :, y0:y1, x0:x1], size=(CROP_SIZE, CROP_SIZE), mode="bilinear",
                                 align_corners=False)[0])
    return torch.stack(out)


def save_grid(ctx: Context, table: pd.DataFrame, layer: str, path: Path) -> None:
    """Images in the first row; receptive-field crops around the argmax below when the table has y/x."""
    model = ctx.model
    if "path" in table:
        paths = table["path"].tolist()
    else:  # neurons of one image: the same image, one crop per neuron
        paths = [str(ctx.store().images().set_index("image_id").loc[_image_id(ctx), "path"])] * len(table)
    views = model_view(model, images_to_tensor(paths, model.transform))
    shown = F.interpolate(views, size=(CROP_SIZE * 2, CROP_SIZE * 2), mode="bilinear", align_corners=False)
    tiles = [shown]
    if {"y", "x"} <= set(table.columns):
        hw = ctx.store().hw(layer)
        c = crops(ctx, views, layer, table["y"].to_numpy(), table["x"].to_numpy(), hw)
        tiles.append(F.interpolate(c, size=shown.shape[-2:], mode="nearest"))
    grid = make_grid(torch.cat(tiles), nrow=len(table), padding=4, pad_value=1.0)
    save_image(grid, path)


def _image_id(ctx: Context) -> str:
    """The query image's id (the config may give an id or a path)."""
    images = ctx.store().images()
    image = str(ctx.cfg.query.image)
    hit = images[(images["image_id"] == image) | (images["path"] == image)]
    return str(hit["image_id"].iloc[0])


def run(ctx: Context) -> dict[str, Any]:
    """Run the query, print the table and save it plus the PNG grid into the run folder."""
    cfg = ctx.cfg.query
    table, layer, what = run_query(ctx)
    out = ctx.run_dir / "query"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{cfg.type}_{layer}"
    if str(cfg.format) == "csv":
        table_path = out / f"{stem}.csv"
        table.to_csv(table_path, index=False)
    else:
        table_path = out / f"{stem}.parquet"
        table.to_parquet(table_path, index=False)
    print(f"\n{what}:\n{table.to_string(index=False)}")
    result: dict[str, Any] = {"query": what, "rows": len(table), "table": str(table_path)}
    if cfg.grid and len(table):
        grid_path = out / f"{stem}.png"
        save_grid(ctx, table, layer, grid_path)
        result["grid"] = str(grid_path)
    return result
