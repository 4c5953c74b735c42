"""stage=report: one self-contained HTML page of the run (``<run>/report.html`` + ``<run>/report_files/``).

It shows the dataset and model (counts, accuracy from the activation store, quarantined files), a
gallery per selected layer (top images and receptive-field crops from the store, gradient-ascent and
deconvnet pictures from stage=visualize), every explained image with each method's overlay
(stage=explain), the explanation-quality metrics, the sanity checks of the methods (computed here
and cached under ``cache/artifacts/sanity/``) and the audit section (stage=audit). Pictures and raw
artifacts are hard-linked (or copied) beside the page; a section whose stage did not run says so.
``report.source`` reads another run folder's stage outputs (``latest``: the newest one that has any).
``report.microscope`` adds the model browser (``<run>/microscope/``, :mod:`pipeline.report.microscope`):
every unit of the store's layers with its pictures (:mod:`pipeline.report.units`) and concept labels.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from pipeline.cache import atomic_write_json, make_key
from pipeline.errors import PipelineError, suggest
from pipeline.methods.base import MapMethod, NotApplicable
from pipeline.methods.hooks import get_layer
from pipeline.methods.registry import METHODS, make_method
from pipeline.methods.sanity import parameter_layers
from pipeline.report import build_report
from pipeline.report import sanity as rs
from pipeline.report.assets import LINK_MODES
from pipeline.report.microscope import FOLDER, INDEX, build_microscope
from pipeline.report.data import (Overview, SanityResult, StoreNeuron, accuracy_tables, read_explain,
                                  read_quarantine, read_visualize)
from pipeline.data.images import images_to_tensor
from pipeline.pictures import map_strip
from pipeline.runtime import Context
from pipeline.settings import plain
from pipeline.report.units import browser_layer, layer_crops, top_table
from pipeline.store import ActivationStore

log = logging.getLogger(__name__)

SANITY_VERSION = 2
SANITY_KIND = "artifacts/sanity"
STAGE_OUTPUTS = ("explain/artifacts.parquet", "visualize/index.parquet", "audit/audit.json")


# ------------------------------------------------------------------------------ sources ---

def source_dir(ctx: Context, spec: Any) -> Path:
    """Where the other stages' outputs are read from: this run (null), ``latest`` (the newest run
    folder under ``<outputs>/runs`` or ``<outputs>/multirun`` with explain, visualize or audit
    outputs), or a given run folder."""
    if spec in (None, ""):
        return ctx.run_dir
    if str(spec) == "latest":
        outputs = Path(ctx.cfg.paths.outputs)
        found = [p.parents[1] for pattern in ("runs/*/*", "multirun/*/*/*") for out in STAGE_OUTPUTS
                 for p in outputs.glob(f"{pattern}/{out}")]
        found = [p for p in found if p.resolve() != ctx.run_dir.resolve()]
        if not found:
            log.warning("report: report.source=latest found no earlier run with stage outputs under %s; "
                        "using this run", outputs)
            return ctx.run_dir
        return max(found, key=lambda p: max((p / o).stat().st_mtime for o in STAGE_OUTPUTS if (p / o).exists()))
    path = Path(str(spec)).expanduser()
    if not path.is_dir():
        raise PipelineError(f"report.source={spec}: no such run folder. Give a run folder (outputs/runs/<date>/"
                            "<time>), latest, or null for this run.")
    return path


# ----------------------------------------------------------------------------- overview ---

def overview(ctx: Context, store: ActivationStore | None, store_note: str) -> Overview:
    """Dataset and model facts, accuracy per split and class from the store, quarantined files."""
    _ = ctx.dataset  # loads the dataset: fills the summary and writes quarantine.csv
    model = ctx.model
    ov = Overview(dataset=dict(ctx.summary["dataset"]),
                  model={**ctx.summary["model"], "training": model.meta.get("training") or {}},
                  quarantine=read_quarantine(ctx.run_dir), stages=dict(ctx.summary["stages"]))
    if store is None:
        ov.accuracy_note = store_note
        return ov
    images = store.images()
    if images["prediction"].notna().any():
        ov.splits, ov.per_class = accuracy_tables(images, model.class_names)
    else:
        ov.accuracy_note = "The activation store has no predictions."
    return ov


def open_store(ctx: Context) -> tuple[ActivationStore | None, str]:
    """The run's activation store, or None and why not."""
    try:
        return ctx.store(), ""
    except PipelineError as e:
        return None, f"No activation store: {e}"


# ------------------------------------------------------------------------------ neurons ---

def report_layers(ctx: Context, store: ActivationStore, spec: Any, key: str = "report.layers") -> list[str]:
    """Layers to show: names or globs among the store's layers (null = all of them), in model order;
    ``key`` names the setting in errors."""
    available = store.layers()
    order = {name: i for i, (name, _) in enumerate(ctx.model.module.named_modules())}
    if spec is None:
        chosen = available
    else:
        chosen = []
        for pattern in [spec] if isinstance(spec, str) else list(spec):
            hits = [n for n in available if fnmatch.fnmatchcase(n, str(pattern))]
            if not hits:
                raise PipelineError(f"{key}: {pattern!r} matches no layer of the activation store "
                                    f"({', '.join(available)}).{suggest(str(pattern), available)} Extract it "
                                    "first (stage=extract extract.layers=[...]) or pick one of those.")
            chosen += [h for h in hits if h not in chosen]
    return sorted(chosen, key=lambda n: order.get(n, len(order)))


def report_channels(store: ActivationStore, layer: str, spec: Any, n: int, top_k: int,
                    vis: pd.DataFrame | None) -> list[int]:
    """Channels of ``layer`` to show: the configured list; else the visualize stage's channels of that
    layer; else the ``n`` whose top-k spatial maxima are highest on average."""
    count = store.channels(layer)
    if spec is not None:
        channels = [int(c) for c in ([spec] if isinstance(spec, (int, str)) else list(spec))]
        bad = [c for c in channels if not 0 <= c < count]
        if bad:
            raise PipelineError(f"report.channels: channel {bad[0]} is out of range for layer {layer!r}, which has "
                                f"{count} channels: use 0..{count - 1}.")
        return channels
    if vis is not None and len(vis) and "layer" in vis:
        rows = vis[(vis["kind"] == "ascent") & (vis["layer"] == layer)]
        if len(rows):
            return list(dict.fromkeys(int(c) for c in rows["channel"]))
    means = np.array([float(store.topk(layer, c, k=top_k, by="max")["value"].mean()) for c in range(count)])
    return [int(c) for c in np.argsort(-np.nan_to_num(means, nan=-np.inf), kind="stable")[:max(1, n)]]


def store_neurons(ctx: Context, store: ActivationStore, vis: pd.DataFrame | None, rcfg: DictConfig) -> list[StoreNeuron]:
    """Top images of each selected neuron and their receptive-field crops. The crops of a layer are
    made in one pass and cached (``cache/artifacts/report_crops/``) by model, layer, units and size."""
    top_k = int(rcfg.top_k)
    out: list[StoreNeuron] = []
    for layer in report_layers(ctx, store, plain(rcfg.layers)):
        channels = report_channels(store, layer, plain(rcfg.channels), int(rcfg.n_channels), top_k, vis)
        tables = [(c, top_table(store, layer, c, top_k)) for c in channels]
        crops = layer_crops(ctx, store, layer, tables)
        start = 0
        for c, t in tables:
            n = len(t)
            captions = [f"#{i + 1} {v:.2f}" for i, v in enumerate(t["value"].astype(float))]
            out.append(StoreNeuron(layer, c, t["path"].astype(str).tolist(), captions, crops[start:start + n],
                                   float(t["value"].mean()) if n else float("nan")))
            start += n
    return out


# --------------------------------------------------------------------------- microscope ---

def microscope(ctx: Context, store: ActivationStore | None, mcfg: DictConfig, title: str, mode: str
               ) -> dict[str, Any] | None:
    """The model browser (``<run>/microscope/``): every unit of the configured layers, each picture a
    cached artifact. None when it is off or there is no activation store to browse."""
    if not bool(mcfg.enabled):
        return None
    if store is None:
        log.warning("report: no model browser without an activation store (run stage=extract first)")
        return None
    top_k, budget = int(mcfg.top_k), int(mcfg.visualize)
    layers = [browser_layer(ctx, store, layer, top_k, budget)
              for layer in tqdm(report_layers(ctx, store, plain(mcfg.layers), "report.microscope.layers"),
                                desc="microscope", unit="layer", disable=None if ctx.progress else True)]
    result = build_microscope(ctx.run_dir, title, layers, mode)
    if result["missing_files"]:
        log.warning("report: the model browser misses %d file(s) (first: %s)", result["missing_files"],
                    result["missing"][0])
    return result


# ------------------------------------------------------------------------------- sanity ---

def sanity_methods(ctx: Context, spec: Any) -> list[str]:
    """Methods to check: the configured ones, or explain.methods that produce maps (not masks)."""
    if spec is None:
        return [m for m in dict.fromkeys(str(m) for m in ctx.cfg.explain.methods)
                if m in METHODS and not METHODS[m].produces_mask]
    methods = [str(m) for m in ([spec] if isinstance(spec, str) else list(spec))]
    for m in methods:
        if m not in METHODS or METHODS[m].produces_mask:
            ranked = [n for n, c in METHODS.items() if not c.produces_mask]
            raise PipelineError(f"report.sanity.methods: no sanity check for {m!r}.{suggest(m, ranked)} "
                                f"Checked methods: {', '.join(ranked)}.")
    return list(dict.fromkeys(methods))


def sanity_images(ctx: Context, source: Path, n: int) -> pd.DataFrame:
    """image_id and path of the images to check: the first explained images, else test images by id."""
    table, _ = read_explain(source)
    if table is not None and len(table):
        first = table.drop_duplicates("image_id")[["image_id", "path"]]
        first = first[first["path"].map(lambda p: Path(p).is_file())]
        if len(first):
            return first.head(n).reset_index(drop=True)
    recs = ctx.dataset.records
    test = recs[recs["split"] == "test"] if (recs["split"] == "test").any() else recs
    return test.sort_values("image_id")[["image_id", "path"]].head(n).reset_index(drop=True)


def sanity_method(ctx: Context, name: str, x0: torch.Tensor) -> tuple[MapMethod | None, str]:
    """Method ``name`` with the explain stage's settings, prepared on ``x0``, or None and why the
    randomisation check does not apply to it."""
    try:
        method = make_method(name, plain(ctx.cfg.explain.get(name))).prepare(ctx.model.module, x0)
    except NotApplicable as err:
        return None, str(err)
    note = method.sanity_note()
    return (None, note) if note else (method, "")


def run_sanity(ctx: Context, source: Path, scfg: DictConfig) -> tuple[list[SanityResult], str]:
    """Each method's sanity checks on a few images, cached by method, settings, model, images and layers."""
    methods = sanity_methods(ctx, plain(scfg.methods))
    if not methods:
        return [], "No method to check: explain.methods (or report.sanity.methods) lists no map method."
    model = ctx.model
    module = model.module.eval()
    if model.num_classes < 2:
        return [], "The class check needs a model with at least two classes."
    images = sanity_images(ctx, source, int(scfg.images))
    if images.empty:
        return [], "No images to check."
    x_all = images_to_tensor(images["path"].tolist(), model.transform).to(ctx.device)
    with torch.no_grad():
        top2 = module(x_all).float().topk(2, dim=1).indices.cpu()
    spec = plain(scfg.layers)
    layers = parameter_layers(module) if spec is None else [str(v) for v in ([spec] if isinstance(spec, str) else spec)]
    for name in layers:
        get_layer(module, name)
    if not layers:
        return [], "The model has no layer with parameters to randomise."
    seed = int(scfg.seed)
    max_final, max_class = float(scfg.max_final_spearman), float(scfg.max_class_spearman)
    max_input = float(scfg.max_input_spearman)
    results = []
    for name in tqdm(methods, desc="sanity", unit="method", disable=None if ctx.progress else True):
        method, why = sanity_method(ctx, name, x_all[:1])
        if method is None:
            results.append(SanityResult(name, "n/a", why))
            continue
        n = min(len(images), int(scfg.costly_images)) if method.many_passes else len(images)
        ids = images["image_id"].astype(str).tolist()[:n]
        settings = method.key_settings()
        key = make_key(kind="sanity", version=SANITY_VERSION, method=name, method_version=method.version,
                       settings=settings, layers=layers, seed=seed, model=model.key, images=ids,
                       targets=top2[:n].tolist())
        folder = ctx.cache.get(SANITY_KIND, key, fanout=True)
        if folder is None:
            log.info("report: sanity checks of %s on %d image(s), %d layer(s)", name, n, len(layers))
            result, cascade = rs.check(module, x_all[:n], top2[:n, 0].to(ctx.device), top2[:n, 1].to(ctx.device),
                                       method, layers, seed)
            with ctx.cache.write(SANITY_KIND, key, {"method": name}, fanout=True) as tmp:
                atomic_write_json(tmp / "sanity.json", {**result, "method": name, "settings": settings,
                                                        "image_ids": ids, "model_key": model.key})
                np.save(tmp / "cascade.npy", cascade)
                map_strip(cascade).save(tmp / "cascade.png")
            folder = ctx.cache.path(SANITY_KIND, key, fanout=True)
        result = json.loads((folder / "sanity.json").read_text())
        rand_ok, class_ok, input_ok, reason = rs.verdict(result, max_final, max_class, max_input)
        status = "n/a" if rand_ok is None and class_ok is None else (
            "fail" if False in (rand_ok, class_ok, input_ok) else "pass")
        results.append(SanityResult(name, status, reason or ("" if status != "n/a" else "no usable map"),
                                    images=int(result["images"]), layers=list(result["layers"]),
                                    steps=[float(v) for v in result["steps"]],
                                    final_spearman=float(result["steps"][-1]) if result["steps"] else float("nan"),
                                    class_spearman=float(result["class_spearman"]),
                                    class_rel_l2=float(result["class_rel_l2"]), randomization_ok=rand_ok,
                                    class_ok=class_ok, strip=str(folder / "cascade.png"),
                                    input_spearman=float(result["input_spearman"]), input_ok=input_ok))
    return results, ""


# ---------------------------------------------------------------------------------- run ---

def run(ctx: Context) -> dict[str, Any]:
    """Gather the run's data, run the sanity checks, and write report.html with its files."""
    rcfg = ctx.cfg.report
    mode = str(rcfg.link_mode)
    if mode not in LINK_MODES:
        raise PipelineError(f"report.link_mode={mode} is not valid.{suggest(mode, LINK_MODES)} "
                            f"Use {' or '.join(LINK_MODES)}.")
    source = source_dir(ctx, rcfg.get("source"))
    store, store_note = open_store(ctx)
    ov = overview(ctx, store, store_note)
    vis, _ = read_visualize(source)
    neurons = store_neurons(ctx, store, vis, rcfg) if store is not None else []
    scfg = rcfg.sanity
    if bool(scfg.enabled):
        sanity, sanity_note = run_sanity(ctx, source, scfg)
    else:
        sanity, sanity_note = [], "Sanity checks are off (report.sanity.enabled=false)."
    model, data = ctx.model, ctx.dataset
    title = str(rcfg.title) if rcfg.get("title") else f"{model.name} on {data.name}"
    browser = microscope(ctx, store, rcfg.microscope, title, mode)
    subtitle = (f"run {ctx.run_dir} · {time.strftime('%Y-%m-%d %H:%M')}"
                + (f" · stage outputs from {source}" if source != ctx.run_dir else ""))
    max_explained = None if rcfg.get("max_explained") is None else int(rcfg.max_explained)
    page, assets = build_report(ctx.run_dir, title, subtitle, source, ov, "", neurons, store_note, sanity, sanity_note,
                                float(scfg.max_final_spearman), float(scfg.max_class_spearman), max_explained, mode,
                                float(scfg.max_input_spearman),
                                microscope=f"{FOLDER}/{INDEX}" if browser else None)
    failed = [r.method for r in sanity if r.status == "fail"]
    for r in sanity:
        if r.status == "fail":
            log.warning("report: sanity check failed for %s: %s", r.method, r.reason)
    table, _ = read_explain(source)
    result: dict[str, Any] = {
        "report": str(page), "source": str(source), "neurons": len(neurons),
        "explained_images": 0 if table is None else int(table["image_id"].nunique()),
        "files": len([u for u in assets.placed.values() if u]), "missing_files": len(assets.missing),
        "sanity": {r.method: r.status for r in sanity}, "sanity_failed": ",".join(failed) or "none",
        "microscope": None if browser is None else browser["index"],
        **({} if browser is None else {f"microscope_{k}": browser[k] for k in ("pages", "units", "missing_files")})}
    if assets.missing:
        log.warning("report: %d linked file(s) are missing (first: %s)", len(assets.missing), assets.missing[0])
    return result
