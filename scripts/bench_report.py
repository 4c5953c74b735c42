"""Benchmark: build the HTML report for 1,000 explained images x 5 methods (target: at most 10 s).

The inputs are synthesized: a run folder with ``explain/artifacts.parquet`` (1,000 images x 5
methods + the centre baseline), ``explain/metrics.json``, and a fake cache of small PNG overlays,
map.npy and meta.json files. Only :func:`pipeline.report.build_report` is timed (reading the
tables, rendering every section, hard-linking ~17,000 files, publishing). The same build with
``link_mode=copy`` runs as the in-run comparison. Results are merged into
``outputs/bench/report.json`` (other fields, such as ``audit_s``, are kept).

    python scripts/bench_report.py [--images 1000] [--methods 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.cache import atomic_write_json
from pipeline.report import build_report

METHODS = ("saliency", "smoothgrad", "occlusion", "cam", "gradcam")
BUDGET_S = 10.0
OUT = Path("outputs/bench/report.json")


def synthesize(root: Path, n_images: int, n_methods: int) -> Path:
    """A run folder as stage=explain leaves it, pointing at a fake cache under ``root``."""
    rng = np.random.default_rng(0)
    run, cache = root / "run", root / "cache"
    (run / "explain" / "panels").mkdir(parents=True)
    pool = []
    for i in range(64):  # distinct overlay pictures, hard-linked into the artifact folders
        p = root / "pool" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
        pool.append(p)
    methods = METHODS[:n_methods]
    rows = []
    for i in range(n_images):
        image = root / "data" / f"{i:05d}_{i % 10}.png"
        image.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(image)
        panel = run / "explain" / "panels" / f"{i:05d}.png"
        panel.hardlink_to(pool[i % len(pool)])
        base = {"image_id": f"{i:064x}", "path": str(image), "split": "test", "selected_by": "random",
                "label": i % 10, "label_name": str(i % 10), "prediction": (i * 7) % 10,
                "prediction_name": str((i * 7) % 10), "score": 0.9, "target": (i * 7) % 10,
                "target_name": str((i * 7) % 10), "target_prob": 0.9, "panel_path": str(panel)}
        for j, m in enumerate(methods):
            key = f"{i:05d}{j}"
            folder = cache / "artifacts" / m / key[:2] / key
            folder.mkdir(parents=True)
            np.save(folder / "map.npy", np.zeros((64, 64), np.float32))
            (folder / "meta.json").write_text(json.dumps({"method": m, "key": key}))
            (folder / "overlay.png").hardlink_to(pool[(i + j) % len(pool)])
            rows.append({**base, "method": m, "key": key, "artifact_dir": str(folder),
                         "map_path": str(folder / "map.npy"), "overlay_path": str(folder / "overlay.png"),
                         "cached": True, "pointing_hit": float(i % 2), "box_iou": 0.4, "box_hit": 0.0,
                         "deletion_auc": 0.2, "insertion_auc": 0.6})
        rows.append({**base, "method": "center (baseline)", "key": None, "artifact_dir": None, "map_path": None,
                     "overlay_path": None, "cached": None, "pointing_hit": 1.0, "box_iou": 0.3, "box_hit": 0.0,
                     "deletion_auc": 0.3, "insertion_auc": 0.4})
    table = pd.DataFrame(rows)
    table["label"] = table["label"].astype("Int64")
    table.to_parquet(run / "explain" / "artifacts.parquet", index=False)
    per = {"images": float(n_images), "pointing": 0.5, "box_accuracy": 0.0, "mean_iou": 0.4,
           "deletion_auc": 0.2, "insertion_auc": 0.6}
    atomic_write_json(run / "explain" / "metrics.json",
                      {"images": n_images, "target": "predicted", "params": {"box_threshold": 0.2, "iou": 0.5},
                       "methods": {**{m: per for m in methods}, "center (baseline)": per}})
    return run


def timed_build(run: Path, mode: str, repeats: int) -> tuple[float, int, int]:
    """Median seconds of ``repeats`` builds, the page's size in bytes and the files placed."""
    times, placed = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        page, assets = build_report(run, "bench", "synthetic", mode=mode)
        times.append(time.perf_counter() - start)
        placed = len([u for u in assets.placed.values() if u])
    return statistics.median(times), page.stat().st_size, placed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--methods", type=int, default=5, choices=range(1, len(METHODS) + 1))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_report_") as tmp:
        start = time.perf_counter()
        run = synthesize(Path(tmp), args.images, args.methods)
        setup_s = time.perf_counter() - start
        report_s, page_bytes, files = timed_build(run, "hardlink", args.repeats)
        copy_s, _, _ = timed_build(run, "copy", args.repeats)
    result = {"report_s": round(report_s, 3),
              "report": {"images": args.images, "methods": args.methods, "repeats": args.repeats,
                         "report_s_hardlink": round(report_s, 3), "report_s_copy": round(copy_s, 3),
                         "copy_over_hardlink": round(copy_s / report_s, 2), "budget_s": BUDGET_S,
                         "report_s_over_budget": round(report_s / BUDGET_S, 3), "within_budget": report_s <= BUDGET_S,
                         "page_bytes": page_bytes, "files_placed": files, "setup_s": round(setup_s, 1)}}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(OUT.read_text()) if OUT.is_file() else {}
    atomic_write_json(OUT, {**old, **result})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
