"""Whole-split reliance against a per-image loop of the reference libraries, in the same run.

Ours: ``explain_split`` (stage=explain with ``explain.select.all=true`` and stage=audit's reliance
section): saliency, Grad-CAM and CAM for every image of the split, batched, scored as they are made
(in-box energy, pointing, box IoU) and written to the map store; timed from a cold map store (the
model is ready on both sides, and both predict every image inside the timed part: ours in the pass
that makes the maps). Baseline: a loop over the same images of Captum ``Saliency`` and
pytorch-grad-cam ``GradCAM`` per image (the predicted class, one forward for it), computing the
same in-box energy with numpy. The digits' manifest leaves out their stroke masks so that both
sides score the same box (with masks ours scores in-mask energy, a little more work).

Data: 2000 clutter-digits test images (the built-in digits_cnn; the dataset generated with
``n_test=2000`` and read as a manifest, so the model is the default-trained one) and 256
EfficientNet-Lite0 images at 224 (random crops of scikit-image's photos, a centred box each).
Each side runs in its own process so that ``peak_rss_mb`` is its own.

Causal variants (the same images): object_only, context_only, mixed_same and mixed_rand built and
predicted from a cold cache, against the bare forward pass of the images (loaded the same way):
``causal_ratio_<model>`` = bare forward seconds / causal seconds.

Writes ``outputs/bench/reliance.json``: ``speedup_<model>`` (baseline seconds / ours),
``images_per_s_<model>`` (ours), ``baseline_images_per_s_<model>``, ``peak_rss_mb`` (ours, the
larger of the two models) and ``baseline_peak_rss_mb``, with the thread count.
Usage: ``python scripts/bench_reliance.py [--threads 1] [--models digits_cnn efficientnet_lite0]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

OUT = Path("outputs/bench/reliance.json")
MODELS = {"digits_cnn": 2000, "efficientnet_lite0": 256}


def make_data(model: str, n: int, root: Path) -> Path:
    """A manifest CSV of ``n`` images with object boxes."""
    from pipeline.cache import Cache
    from pipeline.data.sources import load_dataset

    root.mkdir(parents=True, exist_ok=True)
    if model == "digits_cnn":
        bundle = load_dataset({"source": "clutter_digits", "n_train": 10, "n_test": n}, Cache(root / "cache"))
        recs = bundle.records[bundle.records["split"] == "test"].head(n)
        table = recs[["path", "label", "split", "box_x0", "box_y0", "box_x1", "box_y1"]]
    else:
        from PIL import Image
        from skimage import data as skdata

        rng = np.random.default_rng(0)
        photos = [getattr(skdata, name)() for name in ("chelsea", "coffee", "astronaut", "rocket", "horse")]
        rows = []
        for i in range(n):
            img = photos[i % len(photos)]
            img = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]
            img = (img * 255).astype(np.uint8) if img.dtype == bool else img
            h, w = img.shape[:2]
            s = int(min(h, w) * rng.uniform(0.6, 0.95))
            y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
            p = root / f"photo_{i:04d}.png"
            Image.fromarray(img[y:y + s, x:x + s]).save(p)
            rows.append({"path": str(p), "split": "test", "box_x0": s * 0.25, "box_y0": s * 0.25,
                         "box_x1": s * 0.75, "box_y1": s * 0.75})
        table = pd.DataFrame(rows)
    path = root / "manifest.csv"
    table.to_csv(path, index=False)
    return path


def context(model: str, manifest: Path, outputs: Path) -> Any:
    from hydra import compose, initialize_config_dir

    from pipeline.runtime import Context

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}", "data=manifest", f"data.path={manifest}",
                                           f"paths.outputs={outputs}", "progress=false", "device=cpu",
                                           "explain.methods=[saliency,gradcam,cam]", "explain.select.all=true",
                                           "explain.metrics.curves_per_class=0", "explain.causal.enabled=false"])
    return Context(cfg)


def ours(ctx: Any) -> float:
    from pipeline.explaining import explain_split, method_names

    ecfg = ctx.cfg.explain
    names = method_names(ecfg)
    explain_split(ctx, ecfg, names, "test")  # warm: model, predictions, localizer fit; maps written
    shutil.rmtree(ctx.cache.root / "maps")
    start = time.perf_counter()
    scores, _, _ = explain_split(ctx, ecfg, names, "test")
    seconds = time.perf_counter() - start
    assert int((~scores["cached"]).sum()) == len(scores)
    return seconds


def baseline(ctx: Any) -> float:
    from captum.attr import Saliency
    from pytorch_grad_cam import GradCAM

    from pipeline.data.images import load_image
    from pipeline.methods.base import default_layer
    from pipeline.methods.hooks import get_layer
    from pipeline.selection import input_box

    bundle = ctx.model
    model = bundle.module.eval()
    recs = ctx.dataset.records
    layer = default_layer(model, bundle.transform(load_image(recs["path"].iloc[0]))[None])
    saliency = Saliency(model)
    start = time.perf_counter()
    with GradCAM(model=model, target_layers=[get_layer(model, layer)]) as cam:
        for _, r in recs.iterrows():
            picture = load_image(r["path"])
            x = bundle.transform(picture)[None]
            with torch.no_grad():
                target = int(model(x).argmax(1))
            s = saliency.attribute(x, target=target, abs=True).max(1).values[0].detach().numpy()
            g = cam(input_tensor=x, targets=None)[0]
            box = input_box([r["box_x0"], r["box_y0"], r["box_x1"], r["box_y1"]], picture.size, bundle.transform,
                            tuple(x.shape[-2:]))
            for m in (s, g):
                pos = np.clip(m, 0, None)
                inside = np.zeros_like(pos, dtype=bool)
                if box is not None:
                    x0, y0, x1, y1 = (int(round(v)) for v in box)
                    inside[y0:y1, x0:x1] = True
                _ = float(pos[inside].sum() / max(pos.sum(), 1e-12))
    return time.perf_counter() - start


def causal(ctx: Any) -> float:
    """The four causal variants of every image (built and predicted), from a cold cache."""
    from pipeline.explaining import explain_split
    from pipeline.reliance.backgrounds import CausalChecker

    ecfg = ctx.cfg.explain.copy()
    ecfg.methods = ["saliency"]
    _, _, split = explain_split(ctx, ecfg, ["saliency"], "test")
    shutil.rmtree(ctx.cache.root / "causal", ignore_errors=True)
    start = time.perf_counter()
    # the photos have no labels: each takes its predicted class, so every image is a causal test
    items = [it if it.label is not None else dataclasses.replace(it, label=int(p))
             for it, p in zip(split.items, split.predicted)]
    rows = CausalChecker(ctx, ecfg.causal).run(items, split.predicted, split.keep, split.per_call)
    seconds = time.perf_counter() - start
    assert len(rows) == len(split.items)
    return seconds


def forward(ctx: Any) -> float:
    """The bare forward pass of the same images (loaded and transformed the same way, same batches)."""
    from pipeline.data.images import load_image

    bundle, paths = ctx.model, ctx.dataset.records["path"].tolist()
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(paths), 256):
            bundle.module(torch.stack([bundle.transform(load_image(p)) for p in paths[i:i + 256]])).argmax(1)
    return time.perf_counter() - start


def side(which: str, model: str, threads: int, workdir: Path) -> dict[str, Any]:
    torch.set_num_threads(threads)
    models = Path("outputs/cache/models").resolve()  # the trained built-in model, shared with the pipeline's cache
    (workdir / "outputs" / "cache").mkdir(parents=True, exist_ok=True)
    if models.is_dir() and not (workdir / "outputs" / "cache" / "models").exists():
        (workdir / "outputs" / "cache" / "models").symlink_to(models)
    ctx = context(model, workdir / "manifest.csv", workdir / "outputs")
    seconds = {"ours": ours, "baseline": baseline, "causal": causal, "forward": forward}[which](ctx)
    return {"seconds": seconds, "images": len(ctx.dataset.records),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--side", choices=["ours", "baseline", "causal", "forward"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(side(args.side, args.models[0], args.threads, args.workdir)))
        return
    result: dict[str, Any] = json.loads(OUT.read_text()) if OUT.exists() else {}
    result.update({"threads": args.threads, "torch": torch.__version__, "machine": platform.processor() or
                   platform.machine(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            work = Path(tmp) / model
            make_data(model, MODELS[model], work)
            runs = {}
            for which in ("ours", "baseline", "causal", "forward"):
                out = subprocess.run([sys.executable, __file__, "--side", which, "--models", model, "--threads",
                                      str(args.threads), "--workdir", str(work)], capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{which} on {model} failed:\n{out.stderr[-3000:]}")
                runs[which] = json.loads(out.stdout.strip().splitlines()[-1])
            n = runs["ours"]["images"]
            result[f"speedup_{model}"] = round(runs["baseline"]["seconds"] / runs["ours"]["seconds"], 3)
            result[f"images_per_s_{model}"] = round(n / runs["ours"]["seconds"], 2)
            result[f"baseline_images_per_s_{model}"] = round(n / runs["baseline"]["seconds"], 2)
            result[f"images_{model}"] = n
            result[f"causal_ratio_{model}"] = round(runs["forward"]["seconds"] / runs["causal"]["seconds"], 3)
            result[f"causal_images_per_s_{model}"] = round(n / runs["causal"]["seconds"], 2)
            result[f"peak_rss_mb_{model}"] = round(runs["ours"]["peak_rss_mb"], 1)
            result[f"baseline_peak_rss_mb_{model}"] = round(runs["baseline"]["peak_rss_mb"], 1)
            print(f"{model}: {n} images, ours {n / runs['ours']['seconds']:.1f} img/s, baseline "
                  f"{n / runs['baseline']['seconds']:.1f} img/s -> {result[f'speedup_{model}']}x; causal variants "
                  f"{result[f'causal_images_per_s_{model}']} img/s = {result[f'causal_ratio_{model}']}x the bare forward")
    peaks = [v for k, v in result.items() if k.startswith("peak_rss_mb_")]
    result["peak_rss_mb"] = max(peaks) if peaks else None
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
