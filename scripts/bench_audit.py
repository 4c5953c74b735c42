"""Benchmark stage=audit over a 10,000-image store (the issue's bar: at most 30 s).

Builds once (kept under ``--work`` for re-runs): clutter digits with 9,000 train and 1,000 test
canvases, listed in a manifest so that the built-in CNN trains on a small clutter set instead of
all 10,000 images, then the activation store and its FAISS indexes (stage=[extract,index]). Then
times, each as a whole ``run_stages`` call (config, dataset, model and store loading included):

* ``audit_first_s``: the first audit of a series (no baseline; every thumbnail computed);
* ``audit_s``: the next audit, compared with the first one's snapshot (the scheduled case);

and, as an in-run baseline for the per-neuron part, the top-k table read through ``store.topk``
one channel at a time against the audit's one-pass read of the stored top-K arrays.
Merges ``audit_s`` (and an ``audit`` details object) into ``outputs/bench/report.json`` without
touching its other fields.

    python scripts/bench_audit.py                            # 10,000 images
    python scripts/bench_audit.py --n-train 900 --n-test 100 # quick run
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from pipeline.cache import Cache, atomic_write_json
from pipeline.data import load_dataset
from pipeline.runtime import Context
from pipeline.stages import run_stages
from pipeline.stages.audit import layers_in_model_order, neuron_table

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 30.0


def config(work: Path, manifest: Path, overrides: list[str]) -> DictConfig:
    """The real config: the manifest's images, a small training set for the built-in CNN."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.outputs={work}", "data=manifest", f"data.path={manifest}",
                                            "train.data={n_train:600,n_test:100}", "train.epochs=2",
                                            "progress=false", "device=cpu", *overrides])


def build_manifest(work: Path, n_train: int, n_test: int) -> Path:
    """Generate (cached) clutter digits and list them, with labels, splits and boxes."""
    path = work / f"clutter_{n_train}_{n_test}.parquet"
    if not path.exists():
        data = load_dataset(OmegaConf.create({"source": "clutter_digits", "n_train": n_train, "n_test": n_test}),
                            Cache(work / "cache"))
        cols = ["path", "label", "split", "box_x0", "box_y0", "box_x1", "box_y1"]
        data.records[cols].to_parquet(path, index=False)
    return path


def timed_run(cfg: DictConfig) -> tuple[float, dict]:
    t0 = time.perf_counter()
    summary = run_stages(cfg)
    return time.perf_counter() - t0, summary


def merge_report(path: Path, fields: dict) -> dict:
    """Read-modify-write ``path``: other benchmarks' fields are kept."""
    try:
        report = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        report = {}
    report.update(fields)
    atomic_write_json(path, report)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=9000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench" / "audit_work")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "report.json")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    manifest = build_manifest(work, args.n_train, args.n_test)
    run_stages(config(work, manifest, ["stage=[extract,index]"]))
    setup_s = time.perf_counter() - t0

    shutil.rmtree(work / "audits", ignore_errors=True)
    audit = ["stage=audit", "audit.enforce=false"]
    first_s, first = timed_run(config(work, manifest, audit))
    audit_s, second = timed_run(config(work, manifest, audit))
    result = second["stages"]["audit"]
    details = json.loads(Path(result["report"]).read_text())

    ctx = Context(config(work, manifest, []))
    store = ctx.store()
    layers = layers_in_model_order(ctx, store.layers())
    k = details["topk_changes"]["k"]
    t = time.perf_counter()
    table = neuron_table(store, layers, k)
    one_pass_s = time.perf_counter() - t
    t = time.perf_counter()
    per_channel = [store.topk(layer, c, k=k)["image_id"].tolist()
                   for layer in layers for c in range(store.channels(layer))]
    per_channel_s = time.perf_counter() - t
    assert [list(x) for x in table["top"]] == per_channel, "one-pass top-k read disagrees with store.topk"

    n = args.n_train + args.n_test
    fields = {"audit_s": round(audit_s, 2), "audit": {
        "images": n, "target_s": TARGET_S, "audit_s": round(audit_s, 2), "audit_first_s": round(first_s, 2),
        "ratio_to_target": round(audit_s / TARGET_S, 3), "first_ratio_to_target": round(first_s / TARGET_S, 3),
        "stage_seconds_first": first["stages"]["audit"]["seconds"], "stage_seconds": result["seconds"],
        "parts_s": details["seconds"], "setup_s": round(setup_s, 1),
        "neurons": {"channels": len(table), "one_pass_s": round(one_pass_s, 4),
                    "per_channel_topk_s": round(per_channel_s, 4),
                    "speedup": round(per_channel_s / max(one_pass_s, 1e-9), 1)},
        "findings": {"passed": result["passed"], "duplicates_across_splits": result["duplicates_across_splits"],
                     "dead_neurons": result["dead_neurons"], "label_noise": result["label_noise"],
                     "accuracy": result["accuracy"], "flips": result["flips"]},
        "layers": layers, "machine_note": "2 CPU cores shared with other jobs"}}
    merge_report(args.out, fields)
    print(json.dumps(fields, indent=2))
    print(f"audit over {n} images: first {first_s:.1f} s, with baseline {audit_s:.1f} s "
          f"(target {TARGET_S:.0f} s: ratio {audit_s / TARGET_S:.2f})")


if __name__ == "__main__":
    main()
