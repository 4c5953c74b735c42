"""stage=query: top-k images of a neuron, images along a direction, nearest neighbours of an image,
the top neurons of one image, or the units that detect a concept (after stage=dissect). Prints the
table, saves it, and saves a PNG grid of the images
and of receptive-field crops around each activation's argmax (Zeiler & Fergus's top-9 patches)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.runtime import Context, show
from pipeline.selection import class_index
from pipeline.store.dissect import concept_units
from pipeline.pictures import save_topk_grid

QUERY_TYPES = ("topk", "direction", "neighbours", "neurons", "concept")


def _direction_vector(ctx: Context, store: Any, layer: str) -> tuple[np.ndarray, str]:
    """The query's direction: an explicit vector, or mean of class A minus mean of class B."""
    cfg = ctx.cfg.query
    if cfg.vector is not None:
        return np.asarray(list(cfg.vector), dtype=np.float64), "vector"
    if cfg.class_a is None or cfg.class_b is None:
        raise PipelineError("query.type=direction needs query.vector=[...] or query.class_a and query.class_b.")
    idx = [class_index(c, ctx.model.class_names, "query") for c in (cfg.class_a, cfg.class_b)]
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
    if kind == "concept":
        return _concept_query(ctx, store, k)
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


def _concept_query(ctx: Context, store: Any, k: int) -> tuple[pd.DataFrame, str, str]:
    """The k units (of query.layer, or of every dissected layer) with the highest IoU with
    query.concept, each with its top image (by spatial max) and that image's argmax position."""
    cfg = ctx.cfg.query
    if cfg.concept is None:
        raise PipelineError("query.type=concept needs query.concept=<name> (a class such as 3, fragment, background).")
    layers = [str(cfg.layer)] if cfg.layer else store.layers()
    if cfg.layer:
        store.channels(str(cfg.layer))  # an unknown layer: one line with close matches
    concept = str(cfg.concept)
    units = concept_units(store, layers, concept).head(k)
    tops = [store.topk(layer, int(unit), 1).iloc[0] for layer, unit in zip(units["layer"], units["unit"])]
    for col in ("image_id", "path", "value", "y", "x"):
        units[col] = [t[col] for t in tops]
    one = units["layer"].nunique() == 1
    return units, str(units["layer"].iloc[0]) if one else "layers", f"units detecting {concept!r}"


def _image_path(ctx: Context) -> str:
    """The query image's path (the config may give an id or a path)."""
    images = ctx.store().images()
    image = str(ctx.cfg.query.image)
    hit = images[(images["image_id"] == image) | (images["path"] == image)]
    return str(hit["path"].iloc[0])


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
    show(f"\n{what}:\n{table.to_string(index=False)}")
    result: dict[str, Any] = {"query": what, "rows": len(table), "table": str(table_path)}
    if cfg.grid and len(table):
        grid_path = out / f"{stem}.png"
        paths = table["path"].tolist() if "path" in table else [_image_path(ctx)] * len(table)
        one_layer = "layer" not in table or table["layer"].nunique() == 1  # crops need one layer
        hw = ctx.store().hw(layer) if {"y", "x"} <= set(table.columns) and one_layer else None
        save_topk_grid(ctx.model, paths, layer, table if hw else None, hw, grid_path)
        result["grid"] = str(grid_path)
    return result
