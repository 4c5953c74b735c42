"""What the report shows of a layer's units, read from the activation store or computed through the
cache: top images, receptive-field crops, gradient-ascent pictures, projections, concept labels.

Every picture is a cached artifact: crops per (model, layer, units, images, positions), ascent
pictures and projections with the keys stage=visualize uses (so each reads the other's), so a
second report computes nothing. For the model browser, pictures are computed for the
``report.microscope.visualize`` most active units of each layer; any other unit shows the pictures
already in the cache and says that it has none yet otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from torchvision.transforms.functional import to_pil_image

from pipeline.artifacts import OVERLAY_FILE, PATCH_FILE, artifact_kind
from pipeline.ascent_pictures import ascent_keys, channel_objectives, render_cached
from pipeline.cache import MANIFEST, Cache, make_key
from pipeline.methods.receptive import receptive_field
from pipeline.projections import (KIND, Job, compute, projection_function, projection_jobs, projection_params,
                                  resolve_deconv_mode, resolve_projections)
from pipeline.report.microscope import Layer, TopImage, Unit, unit_tables
from pipeline.runtime import Context
from pipeline.store import ActivationStore, dissect
from pipeline.data.images import images_to_tensor
from pipeline.pictures import CROP_SIZE, model_view, rf_crops

log = logging.getLogger(__name__)

CROPS_VERSION = 1
CROPS_KIND = "artifacts/report_crops"
BROWSER_CROPS_KIND = "artifacts/microscope_crops"
CHUNK = 32   # units per cached crop folder and per gradient-ascent batch (bounds the memory of one batch)


def top_table(store: ActivationStore, layer: str, channel: int, k: int) -> pd.DataFrame:
    """The ``k`` top images of a unit by spatial max whose files are still on disk (the others logged)."""
    t = store.topk(layer, channel, k=k, by="max")
    present = t["path"].map(lambda p: Path(p).is_file())
    if not present.all():
        log.warning("report: %d top image(s) of %s:%d are no longer on disk; left out", int((~present).sum()),
                    layer, channel)
    return t[present].reset_index(drop=True)


def layer_crops(ctx: Context, store: ActivationStore, layer: str, tables: list[tuple[int, pd.DataFrame]],
                kind: str = CROPS_KIND) -> list[str]:
    """PNG paths of the receptive-field crops of every (channel, top image) in ``tables``, in order:
    made in one pass and cached under ``kind`` by model, layer, units, images, positions and size."""
    rows = pd.concat([t for _, t in tables], ignore_index=True) if tables else pd.DataFrame()
    if rows.empty:
        return []
    model = ctx.model
    units = [[c, t["image_id"].astype(str).tolist(), t["y"].astype(int).tolist(), t["x"].astype(int).tolist()]
             for c, t in tables]
    key = make_key(kind=kind.rpartition("/")[2], version=CROPS_VERSION, model=model.key, layer=layer,
                   size=CROP_SIZE, units=units)
    folder = ctx.cache.get(kind, key, fanout=True)
    if folder is None:
        unique = list(dict.fromkeys(rows["path"]))
        views = model_view(model, images_to_tensor(unique, model.transform))
        index = {p: i for i, p in enumerate(unique)}
        crops = rf_crops(model, views[[index[p] for p in rows["path"]]], layer, rows["y"].to_numpy(),
                         rows["x"].to_numpy(), store.hw(layer), CROP_SIZE).clamp(0, 1).cpu()
        with ctx.cache.write(kind, key, {"layer": layer, "crops": len(crops)}, fanout=True) as tmp:
            for j, crop in enumerate(crops):
                to_pil_image(crop).save(tmp / f"{j}.png")
        folder = ctx.cache.path(kind, key, fanout=True)
    return [str(folder / f"{j}.png") for j in range(len(rows))]


def cached_folder(cache: Cache, method: str, key: str, compute: bool) -> Path | None:
    """An artifact's folder when it is complete (counted as a hit), else None: counted as a miss
    when it is about to be computed (``compute``), not counted for a unit that only shows what the
    cache holds."""
    path = cache.path(artifact_kind(method), key, fanout=True)
    if compute or (path / MANIFEST).is_file():
        return cache.get(artifact_kind(method), key, fanout=True)
    return None


def dissect_tables(store: ActivationStore, layer: str
                   ) -> tuple[pd.DataFrame | None, pd.DataFrame | None, dict[str, Any] | None]:
    """The layer's unit labels, ranked concept IoUs and dissection summary (None: not dissected)."""
    return dissect.read_unit_labels(store, layer), dissect.read_dissection(store, layer), \
        dissect.read_dissect_summary(store, layer)


# --------------------------------------------------------------------------- pictures ---

def unit_ascents(ctx: Context, layer: str, units: list[int], drawn: set[int]) -> dict[int, str]:
    """The gradient-ascent picture (PNG path) of each unit that has one: rendered (in batches of
    :data:`CHUNK`) for the units in ``drawn`` that lack it, read from the cache for the others."""
    names, _ = channel_objectives(ctx, layer, units)
    out: dict[int, str] = {}
    todo: list[int] = []
    for c, key in zip(units, ascent_keys(ctx, "ascent", names)):
        folder = cached_folder(ctx.cache, "ascent", key, False)
        if folder is not None:
            out[c] = str(folder / OVERLAY_FILE)
        elif c in drawn:
            todo.append(c)
    for s in range(0, len(todo), CHUNK):
        chunk = todo[s:s + CHUNK]
        for c, art in zip(chunk, render_cached(ctx, "ascent", *channel_objectives(ctx, layer, chunk))):
            out[c] = str(art.overlay_path)
    return out


def unit_projections(ctx: Context, layer: str, hw: tuple[int, int], tops: dict[int, pd.DataFrame],
                     drawn: set[int]) -> tuple[dict[int, dict[str, list[tuple[str, str]]]], str]:
    """Each unit's projections of its top images that fire it (value > 0), by method title, as
    (projection, patch) PNG paths: computed for the units in ``drawn``, read from the cache for
    the others; and a note on which methods are drawn and why."""
    model = ctx.model
    vcfg = ctx.cfg.visualize
    methods, _, why = resolve_projections(model, layer, str(vcfg.projection))
    mode = resolve_deconv_mode(model, layer, str(vcfg.deconv.mode))[0] if "deconvnet" in methods else ""
    params = projection_params(ctx, layer, mode)
    titles = {"deconvnet": "deconvnet", "guided_backprop": "guided backprop"}
    found: dict[str, Path] = {}
    field: tuple[int, int] | None = None
    jobs: dict[str, dict[int, list[Job]]] = {}
    for m in methods:
        jobs[m] = {c: projection_jobs(ctx, m, params[m], c, t[t["value"] > 0]) for c, t in tops.items()}
        missing = []
        for c, js in jobs[m].items():
            for j in js:
                folder = cached_folder(ctx.cache, KIND[m], j.key, c in drawn)
                if folder is not None:
                    found[j.key] = folder
                elif c in drawn:
                    missing.append(j)
        if missing:
            field = field or receptive_field(model.module, layer, model.input_shape)
            made = compute(ctx, layer, hw, missing, projection_function(m, mode), field, params[m])
            found.update({k: a.folder for k, a in made.items()})
    out: dict[int, dict[str, list[tuple[str, str]]]] = {}
    for m in methods:
        for c, js in jobs[m].items():
            pairs = [(str(found[j.key] / OVERLAY_FILE), str(found[j.key] / PATCH_FILE)) for j in js if j.key in found]
            if pairs:
                out.setdefault(c, {})[titles[m]] = pairs
    drawn_note = "configured (visualize.projection)" if why == "configured" else why
    return out, f"Projections: {', '.join(titles[m] for m in methods)}; {drawn_note}."


# ------------------------------------------------------------------------- a layer's page ---

def browser_layer(ctx: Context, store: ActivationStore, layer: str, top_k: int, budget: int) -> Layer:
    """Everything the model browser shows of ``layer``: every unit's top images and crops, and the
    pictures of the ``budget`` most active units (by mean top-k spatial max) or already cached."""
    model = ctx.model
    hw = store.hw(layer)
    units = list(range(store.channels(layer)))
    tops = {c: top_table(store, layer, c, top_k) for c in units}
    crops: list[str] = []
    for s in range(0, len(units), CHUNK):
        crops += layer_crops(ctx, store, layer, [(c, tops[c]) for c in units[s:s + CHUNK]], BROWSER_CROPS_KIND)
    means = {c: float(t["value"].mean()) if len(t) else float("-inf") for c, t in tops.items()}
    drawn = set(sorted(units, key=lambda c: -means[c])[:budget]) if model.takes_hooks else set()
    ascents = unit_ascents(ctx, layer, units, drawn)
    projections, projection_note = unit_projections(ctx, layer, hw, tops, drawn)
    labels, dissection, summary = dissect_tables(store, layer)
    label_rows, ranked = unit_tables(labels, dissection)
    names = model.class_names
    out: list[Unit] = []
    start = 0
    for c in units:
        t = tops[c]
        top = [TopImage(str(r.path), crops[start + i], float(r.value),
                        names[int(r.label)] if pd.notna(r.label) and 0 <= int(r.label) < len(names) else "")
               for i, r in enumerate(t.itertuples(index=False))]
        start += len(t)
        out.append(Unit(c, top, ascents.get(c), projections.get(c, {}), label_rows.get(c), ranked.get(c)))
    missing = len(units) - len(ascents)
    if not model.takes_hooks:
        note = f"{model.name} takes no forward hooks, so no feature visualisation or projection is drawn."
    elif missing:
        note = (f"Feature visualisations and projections are drawn for the {len(drawn)} most active units "
                f"(report.microscope.visualize={budget}); {missing} of {len(units)} units have none yet. Raise "
                f"report.microscope.visualize (up to {len(units)}) to draw them: each picture is cached.")
    else:
        note = ""
    return Layer(layer, hw, out, note, projection_note, summary)
