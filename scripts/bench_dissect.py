"""Benchmark of stage=dissect: its throughput (forward with the map cache, thresholds, IoU: every
pass together) against a bare forward over the same images in the same run, its peak memory at two
dataset sizes, and a re-run with 1% more images. Writes outputs/bench/dissect.json.

The extract stage (which dissect needs) runs first and is not timed. Each dissect run starts from an
empty map cache and no stored dissection, in a fresh child process, so its peak RSS is its own; the
stage's time is the stage's own (``seconds`` of its summary; interpreter and torch start-up are on
neither side). The bare forward uses the same DataLoader and batch size, the whole model, no hooks;
``ratio`` is against the model run as it is, ``ratio_to_channels_last`` against it run in the
channels_last layout (weights too) that dissect's own forward uses on the CPU.

    python scripts/bench_dissect.py [--n 6000] [--n-lite 512] [--n-incremental 2000] [--threads 2]
        [--device cpu] [--models-cache outputs/cache/models]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from pipeline.cache import Cache
from pipeline.data import load_dataset
from pipeline.data.loader import record_loader
from pipeline.methods.execution import FastLayout
from pipeline.runtime import Context
from pipeline.stages import run_stages
from pipeline.store.dissect import FOLDER

ROOT = Path(__file__).resolve().parents[1]


def config(outputs: Path, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.outputs={outputs}", "progress=false", *overrides])


@torch.no_grad()
def bare_forward(ctx: Context, batch_size: int, fast: bool = False) -> float:
    """Seconds for the same DataLoader and the whole model's forward, with nothing recorded: the
    model as it is, or (``fast``) in the channels_last layout dissect runs it in."""
    model = ctx.model
    model.module.eval()
    run = FastLayout(model.module, ctx.device, weights=True) if fast else model.module
    start = time.perf_counter()
    for x, _ in record_loader(ctx.dataset.records, model.transform, batch_size, 0):
        run(x.to(ctx.device))
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def forget_dissection(outputs: Path, ctx: Context) -> None:
    """Remove the map cache and every stored dissection, so the next run does all the work."""
    shutil.rmtree(outputs / "cache" / FOLDER, ignore_errors=True)
    for folder in (ctx.store().root / ".meta").glob(f"*/{FOLDER}"):
        shutil.rmtree(folder)


def _child(outputs: Path, overrides: list[str], threads: int, queue: mp.Queue) -> None:
    torch.set_num_threads(threads)
    summary = run_stages(config(outputs, ["stage=dissect", *overrides]))
    queue.put({"stage": summary["stages"]["dissect"],
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def dissect_in_child(outputs: Path, overrides: list[str], threads: int) -> dict:
    """One stage=dissect run in a fresh process: its summary and its peak RSS."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(outputs, overrides, threads, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def measure(outputs: Path, overrides: list[str], threads: int, repeats: int) -> dict:
    """Dissect seconds vs the bare forward (best of ``repeats``, alternating, from scratch each time)."""
    run_stages(config(outputs, ["stage=extract", *overrides]))
    ctx = Context(config(outputs, ["stage=dissect", *overrides]))
    n = len(ctx.dataset.records)
    bs = int(ctx.cfg.dissect.batch_size)
    bare, fast, ours, runs = [], [], [], []
    for _ in range(repeats):
        bare.append(bare_forward(ctx, bs))
        fast.append(bare_forward(ctx, bs, fast=True))
        forget_dissection(outputs, ctx)
        run = dissect_in_child(outputs, overrides, threads)
        ours.append(run["stage"]["seconds"])
        runs.append(run)
    best = runs[ours.index(min(ours))]
    return {"images": n, "bare_s": min(bare), "dissect_s": min(ours), "ratio": min(bare) / min(ours),
            "bare_channels_last_s": min(fast), "ratio_to_channels_last": min(fast) / min(ours),
            "bare_images_per_s": n / min(bare), "dissect_images_per_s": n / min(ours),
            "seconds_by_pass": best["stage"]["seconds_by_pass"], "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "iou_size": best["stage"]["iou_size"],
            "unique_detectors": {k: v["unique_detectors"] for k, v in best["stage"]["layers"].items()},
            "labelled": {k: v["labelled"] for k, v in best["stage"]["layers"].items()},
            "units": {k: v["units"] for k, v in best["stage"]["layers"].items()}}


def clutter_manifest(outputs: Path, n: int, name: str) -> Path:
    """A manifest CSV of n generated clutter digits (boxes, masks, fragment boxes)."""
    data = load_dataset({"source": "clutter_digits", "n_train": n, "n_test": 1, "seed": 7}, Cache(outputs / "cache"))
    recs = data.records[data.records["split"] == "train"]
    cols = ["path", "label", "split", "box_x0", "box_y0", "box_x1", "box_y1", "mask", "fragment_boxes"]
    path = outputs / f"{name}.csv"
    recs[cols].to_csv(path, index=False)
    return path


def incremental(outputs: Path, n: int, threads: int) -> dict:
    """Dissect n images, then again after 1% more were added: what the re-run forwards and costs."""
    full = clutter_manifest(outputs, n + n // 100, "incr")
    table = pd.read_csv(full)
    table.iloc[:n].to_csv(outputs / "incr_now.csv", index=False)
    over = ["data=manifest", f"data.path={outputs / 'incr_now.csv'}"]
    run_stages(config(outputs, ["stage=extract", *over]))
    first = dissect_in_child(outputs, over, threads)
    table.to_csv(outputs / "incr_now.csv", index=False)
    run_stages(config(outputs, ["stage=extract", *over]))
    again = dissect_in_child(outputs, over, threads)
    return {"images": n, "added": n // 100, "full_s": first["stage"]["seconds"], "rerun_s": again["stage"]["seconds"],
            "fraction": again["stage"]["seconds"] / first["stage"]["seconds"],
            "rerun_forwarded": again["stage"]["forwarded"], "rerun_seconds_by_pass": again["stage"]["seconds_by_pass"],
            "peak_rss_mb_full": first["peak_rss_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=6000,
                    help="clutter-digit images for digits_cnn (the default dataset's size)")
    ap.add_argument("--n-lite", type=int, default=512, help="clutter-digit images for efficientnet_lite0")
    ap.add_argument("--n-incremental", type=int, default=2000, help="images of the full run before adding 1%%")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models-cache", default=None,
                    help="a cache/models folder holding the trained default model, to skip training it again")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "dissect.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.models_cache:
            shutil.copytree(args.models_cache, tmp / "cache" / "models")
        dev = [f"device={args.device}"]
        run_stages(config(tmp, ["stage=train", *dev]))  # the default model, trained once (or found in the cache)
        # the built-in model trains on the clutter digits it is run on: the same model needs the same
        # dataset, so other sizes come as manifests of other generated digits
        digits_data = ([] if args.n == 6000 else
                       ["data=manifest", f"data.path={clutter_manifest(tmp, args.n, 'digits')}"])
        digits = measure(tmp, [*dev, *digits_data], args.threads, args.repeats)
        half_data = clutter_manifest(tmp, args.n // 2, "half")
        half = measure(tmp, [*dev, "data=manifest", f"data.path={half_data}"], args.threads, 1)
        lite_data = clutter_manifest(tmp, args.n_lite, "lite")
        lite = measure(tmp, [*dev, "model=efficientnet_lite0", "data=manifest", f"data.path={lite_data}",
                             "extract.batch_size=32", "dissect.batch_size=32"], args.threads, args.repeats)
        incr = incremental(tmp, args.n_incremental, args.threads)
    result = {"ratio_digits_cnn": digits["ratio"], "ratio_efficientnet_lite0": lite["ratio"],
              "ratio_to_channels_last_digits_cnn": digits["ratio_to_channels_last"],
              "ratio_to_channels_last_efficientnet_lite0": lite["ratio_to_channels_last"],
              "peak_rss_mb": max(digits["peak_rss_mb"], lite["peak_rss_mb"]),
              "peak_rss_mb_by_images_digits_cnn": {str(half["images"]): half["peak_rss_mb"],
                                                   str(digits["images"]): digits["peak_rss_mb"]},
              "unique_detectors": {"digits_cnn": digits["unique_detectors"],
                                   "efficientnet_lite0": lite["unique_detectors"]},
              "incremental_1pct_fraction": incr["fraction"],
              "digits_cnn": digits, "digits_cnn_half": half, "efficientnet_lite0": lite, "incremental": incr,
              "threads": args.threads, "device": args.device}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
