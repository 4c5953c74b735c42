"""Benchmark of stage=extract: throughput against a bare DataLoader + forward loop, storage size,
and an incremental re-run with 1% more images. Writes outputs/bench/extract.json.

Every timing is of the stage's work in this process: the config is composed before the clock
starts (interpreter and torch start-up are outside both sides of each ratio). The extract side
includes everything the stage does: listing the dataset, planning, stats, Parquet parts, the
running top-K and finalize.

    python scripts/bench_extract.py [--n 20000] [--n-lite 256] [--n-incremental 10000] [--threads 2]
        [--models-cache outputs/cache/models]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from pipeline.cache import Cache
from pipeline.data import load_dataset
from pipeline.data.loader import record_loader
from pipeline.runtime import Context
from pipeline.stages import run_stages

ROOT = Path(__file__).resolve().parents[1]


def config(outputs: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.outputs={outputs}", "progress=false", "device=cpu", *overrides])


@torch.no_grad()
def bare_loop(ctx: Context, batch_size: int) -> float:
    """Seconds for the same DataLoader and model forward, with nothing recorded or stored."""
    model = ctx.model
    loader = record_loader(ctx.dataset.records, model.transform, batch_size, 0)
    start = time.perf_counter()
    for x, _ in loader:
        model.module(x)
    return time.perf_counter() - start


def store_bytes(ctx: Context) -> int:
    root = ctx.store().root
    return sum(p.stat().st_size for p in root.rglob("*.parquet") if p.parent.name != ".work")


def measure(outputs: Path, overrides: list[str], repeats: int = 2) -> dict:
    """Extraction seconds vs the bare loop (best of ``repeats``, alternating, fresh store each time)."""
    cfg = config(outputs, ["stage=extract", *overrides])
    ctx = Context(cfg)
    n = len(ctx.dataset.records)
    bs = int(cfg.extract.batch_size)
    bare, ours, loop_rate = [], [], []
    for _ in range(repeats):
        bare.append(bare_loop(ctx, bs))
        shutil.rmtree(outputs / "cache" / "store", ignore_errors=True)
        start = time.perf_counter()
        summary = run_stages(cfg)
        ours.append(time.perf_counter() - start)
        loop_rate.append(summary["stages"]["extract"]["images_per_s"])
    layers = len(ctx.store().layers())
    return {"images": n, "layers": layers, "bare_s": min(bare), "extract_s": min(ours),
            "ratio": min(bare) / min(ours), "bare_images_per_s": n / min(bare),
            "extract_images_per_s": n / min(ours), "extract_loop_images_per_s": max(loop_rate),
            "bytes_per_image_layer": store_bytes(ctx) / (n * layers)}


def photo_folder(folder: Path, n: int, seed: int = 0) -> None:
    """n 256x256 crops of scikit-image's photos (flipped, shifted), as PNG files."""
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = [np.asarray(getattr(skimage.data, name)()) for name in ("chelsea", "coffee", "astronaut", "rocket")]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        y, x = rng.integers(0, h - 256), rng.integers(0, w - 256)
        crop = img[y:y + 256, x:x + 256]
        Image.fromarray(crop[:, ::-1] if rng.random() < 0.5 else crop).save(folder / f"{i:05d}.png")


def clutter_paths(outputs: Path, n: int) -> list[str]:
    """Paths of n generated clutter-digit images (cached under ``outputs``)."""
    data = load_dataset({"source": "clutter_digits", "n_train": n, "n_test": 0, "seed": 7}, Cache(outputs / "cache"))
    return data.records["path"].tolist()


def digit_folder(outputs: Path, paths: list[str], name: str) -> Path:
    """A flat folder holding copies of ``paths``."""
    folder = outputs / name
    folder.mkdir()
    for p in paths:
        shutil.copy(p, folder / Path(p).name)
    return folder


def incremental(outputs: Path, paths: list[str], n: int) -> dict:
    """Full extract of n clutter images from a folder, then a re-run after adding 1% new images."""
    added = paths[n:n + n // 100]
    folder = digit_folder(outputs, paths[:n], "incr")
    cfg = config(outputs, ["stage=extract", "data=imagefolder", f"data.path={folder}"])
    start = time.perf_counter()
    run_stages(cfg)
    full = time.perf_counter() - start
    for p in added:
        shutil.copy(p, folder / Path(p).name)
    start = time.perf_counter()
    summary = run_stages(cfg)
    again = time.perf_counter() - start
    assert summary["stages"]["extract"]["processed"] == len(added)
    return {"images": n, "added": len(added), "full_s": full, "rerun_s": again, "fraction": again / full}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=20000,
                    help="clutter-digit images for the digits_cnn ratio (enough that start-up costs do not decide it)")
    ap.add_argument("--n-lite", type=int, default=256, help="224x224 images for the efficientnet_lite0 ratio")
    ap.add_argument("--n-incremental", type=int, default=10000, help="images of the full run before adding 1%%")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models-cache", default=None,
                    help="a cache/models folder holding the trained default model, to skip training it again")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "extract.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.models_cache:
            shutil.copytree(args.models_cache, tmp / "cache" / "models")
        run_stages(config(tmp, ["stage=train"]))  # the default model, trained once (or found in the cache)
        pool = clutter_paths(tmp, max(args.n, args.n_incremental + args.n_incremental // 100))
        digits = measure(tmp, ["data=imagefolder", f"data.path={digit_folder(tmp, pool[:args.n], 'digits')}"])
        photo_folder(tmp / "photos", args.n_lite)
        lite = measure(tmp, ["model=efficientnet_lite0", "data=imagefolder", f"data.path={tmp / 'photos'}",
                             "extract.batch_size=32"])
        incr = incremental(tmp, pool, args.n_incremental)
    result = {"ratio_digits_cnn": digits["ratio"], "ratio_efficientnet_lite0": lite["ratio"],
              "bytes_per_image_layer": digits["bytes_per_image_layer"],
              "bytes_per_image_layer_efficientnet_lite0": lite["bytes_per_image_layer"],
              "incremental_1pct_fraction": incr["fraction"], "digits_cnn": digits, "efficientnet_lite0": lite,
              "incremental": incr, "threads": args.threads}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
