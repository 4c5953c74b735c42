"""Benchmark the activation store's queries on a synthetic store of N images x C channels.

Writes the store through the real writer API (plan / plan.write / finalize), builds the exact and
IVF indexes, then measures in the same run:

* per-neuron top-k lookups against the pandas baseline (read the neuron's Parquet column, nlargest);
* exact direction / neighbour queries (int8 pre-scan with an error bound + exact re-rank), checked
  against a full float64 scan and timed against a plain FAISS flat search;
* approximate (IVF) queries and their recall@10 against the exact answers.

The synthetic pooled features are what CNN layers give after ReLU: non-negative, clustered by
class (1000 classes), with a power-law spectrum inside each class. Writes outputs/bench/query.json.

    python scripts/bench_query.py             # 1,000,000 x 512 (about 8 GB of disk, several minutes)
    python scripts/bench_query.py --n 20000   # quick run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from pipeline.store import ActivationStore, layer_dirname

LAYER = "layer4"
MODEL_KEY = "bench-synthetic-model"
N_CLASSES = 1000
HW = (7, 7)


class Features:
    """Class-clustered, power-law, non-negative pooled features, generated per chunk from labels."""

    def __init__(self, channels: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.centers = np.maximum(rng.standard_normal((N_CLASSES, channels)), 0).astype(np.float32)
        rank = min(channels, 256)
        basis, _ = np.linalg.qr(rng.standard_normal((channels, rank)))
        sigma = 1.5 / np.arange(1, rank + 1) ** 0.5
        self.mix = (sigma[:, None] * basis.T).astype(np.float32)
        self.channels = channels

    def chunk(self, labels: np.ndarray, seed: int) -> dict:
        rng = np.random.default_rng(seed)
        n, c = len(labels), self.channels
        mean = self.centers[labels]
        mean += rng.standard_normal((n, self.mix.shape[0]), dtype=np.float32) @ self.mix
        mean += 0.05 * rng.standard_normal((n, c), dtype=np.float32)
        np.maximum(mean, 0, out=mean)
        peak = mean * (1.0 + rng.random((n, c), dtype=np.float32))
        argmax = rng.integers(0, HW[0] * HW[1], (n, c), dtype=np.int32)
        return {"max": peak, "mean": mean, "argmax": argmax, "hw": HW}


def predictions(labels: np.ndarray, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    n = len(labels)
    ids = np.stack([labels] + [rng.integers(0, N_CLASSES, n) for _ in range(4)], 1).astype(np.int32)
    scores = np.sort(rng.dirichlet(np.ones(5), n).astype(np.float32), 1)[:, ::-1]
    return {"prediction": labels, "top5_ids": ids, "top5_scores": scores,
            "true_score": rng.standard_normal(n).astype(np.float32)}


def p50(samples: list[float]) -> float:
    return round(float(np.median(samples)) * 1000, 3)


def timed(fn, repeat: int) -> tuple[list[float], list]:
    times, results = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        results.append(fn())
        times.append(time.perf_counter() - t0)
    return times, results


def write_store(root: Path, n: int, channels: int, part_size: int) -> dict:
    """Create the synthetic store through the writer API; returns timings."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(7)
    records = pd.DataFrame({
        "image_id": [hashlib.sha256(f"bench-{i}".encode()).hexdigest() for i in range(n)],
        "path": [f"synthetic/{i:07d}.png" for i in range(n)],
        "label": rng.integers(0, N_CLASSES, n),
        "split": np.where(rng.random(n) < 0.8, "train", "val"),
    })
    features = Features(channels)
    store = ActivationStore.open(root, MODEL_KEY, create=True, top_k=100)
    t_records = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = store.plan(records, [LAYER])
    t_plan = time.perf_counter() - t0
    gen_s = 0.0
    for i, chunk in enumerate(plan.chunks(part_size)):
        g0 = time.perf_counter()
        labels = chunk["label"].to_numpy(np.int64)
        acts = features.chunk(labels, seed=1000 + i)
        preds = predictions(labels, seed=2000 + i)
        gen_s += time.perf_counter() - g0
        plan.write(chunk, {LAYER: acts}, preds)
        print(f"  part {i}: {len(chunk)} rows", file=sys.stderr, flush=True)
    t_write = time.perf_counter() - t0 - t_plan - gen_s
    f0 = time.perf_counter()
    store.finalize(records)
    return {"synthetic_records_s": round(t_records, 2), "plan_s": round(t_plan, 2), "write_s": round(t_write, 2), "synthetic_generation_s": round(gen_s, 2),
            "finalize_s": round(time.perf_counter() - f0, 2),
            "write_rows_per_s": round(n / max(t_write, 1e-9))}


def brute_force(rows: np.ndarray, vectors: np.ndarray, vector: np.ndarray, k: int) -> list[int]:
    """Exact answer by a full float64 scan of the stored mean vectors (independent of the index),
    ordered like the store's answers: score descending, then row id ascending."""
    scores = np.concatenate([vectors[s:s + 65536].astype(np.float64) @ np.asarray(vector, np.float64)
                             for s in range(0, len(vectors), 65536)])
    return rows[np.lexsort((rows, -scores))[:k]].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--channels", type=int, default=512)
    ap.add_argument("--part-size", type=int, default=65536)
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--root", default="outputs/bench/query_store")
    ap.add_argument("--out", default="outputs/bench/query.json")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic store for another run")
    ap.add_argument("--reuse", action="store_true", help="reuse a store left by --keep")
    args = ap.parse_args()
    root = Path(args.root)
    result: dict = {"n_images": args.n, "n_channels": args.channels, "layer": LAYER, "top_k_stored": 100}

    if not (args.reuse and (root / "manifest.json").exists()):
        shutil.rmtree(root, ignore_errors=True)
        print("writing the synthetic store...", file=sys.stderr)
        result.update(write_store(root, args.n, args.channels, args.part_size))
    store = ActivationStore.open(root, MODEL_KEY)
    layer_dir = root / layer_dirname(LAYER)
    part_bytes = sum(p.stat().st_size for p in layer_dir.glob("*.parquet"))
    result["storage_bytes_per_image_per_layer"] = round(part_bytes / args.n, 1)
    result["images_parquet_bytes_per_image"] = round((root / "images.parquet").stat().st_size / args.n, 1)

    print("building indexes...", file=sys.stderr)
    t0 = time.perf_counter()
    store.class_direction(LAYER, 0, 1)
    result["class_means_first_call_s"] = round(time.perf_counter() - t0, 2)
    flat = store.build_index(LAYER, "flat", "ip")
    ivf = store.build_index(LAYER, "ivf", "ip")
    result.update({"flat_build_s": flat["build_seconds"], "ivf_build_s": ivf["build_seconds"],
                   "ivf_nlist": ivf["nlist"], "ivf_nprobe": ivf["nprobe"],
                   "ivf_calibration_recall_at_10": ivf["calibration_recall_at_10"]})
    index_dir = root / ".meta" / layer_dirname(LAYER)
    result["index_bytes_per_image"] = {
        d.name: round(sum(f.stat().st_size for f in d.iterdir()) / args.n, 1)
        for d in index_dir.iterdir() if d.is_dir()}

    rng = np.random.default_rng(11)
    channels = rng.integers(0, args.channels, 200)

    # per-neuron top-k: first call on a freshly opened store, then warm lookups
    cold = ActivationStore.open(root, MODEL_KEY)
    t0 = time.perf_counter()
    cold.topk(LAYER, int(channels[0]), k=5)
    result["topk_first_call_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    it = iter(channels.tolist() * 2)
    t_topk, tops = timed(lambda: store.topk(LAYER, next(it), k=5, by="max"), 200)
    store.topk(LAYER, 0, k=5)
    result["topk_p50_ms"] = p50(t_topk)
    result["topk_p90_ms"] = round(float(np.percentile(t_topk, 90)) * 1000, 3)

    def pandas_topk(c: int) -> pd.DataFrame:
        col = f"max_{c}"
        return pd.read_parquet(layer_dir, columns=["row_id", col]).nlargest(5, col)

    it = iter(channels[:9].tolist())
    t_pd, pd_res = timed(lambda: pandas_topk(next(it)), 9)
    result["pandas_p50_ms"] = p50(t_pd)
    result["topk_speedup_vs_pandas"] = round(result["pandas_p50_ms"] / result["topk_p50_ms"], 1)
    agree = [set(tops[i]["row_id"]) == set(pd_res[i]["row_id"]) for i in range(9)]
    result["topk_matches_pandas"] = f"{sum(agree)}/9 (ties may order differently)"
    it = iter(channels[:5].tolist())
    t_scan, _ = timed(lambda: store.topk(LAYER, next(it), k=500, by="mean"), 5)
    result["topk_column_scan_k500_p50_ms"] = p50(t_scan)

    # query vectors: neighbours of stored images, class directions, random directions
    images = store.images()
    picks = images["path"].to_numpy()[rng.integers(0, args.n, args.queries // 2)]
    labels = images["label"].dropna().astype(int).unique()
    pairs = rng.choice(labels, (args.queries - len(picks), 2))
    directions = [store.class_direction(LAYER, int(a), int(b)) for a, b in pairs if a != b]
    vec_rows, vectors, _ = store.mean_vectors(LAYER)
    position = {int(r): i for i, r in enumerate(vec_rows)}
    neighbour_vectors = [vectors[position[store.row_of(p)]] for p in picks]
    random_dirs = [rng.standard_normal(args.channels) for _ in range(10)]

    def run(queries, exact: bool, kind: str):
        out = []
        for q in queries:
            t0 = time.perf_counter()
            res = store.neighbours(LAYER, q, k=10, metric="ip", exact=exact) if kind == "nb" \
                else store.direction(LAYER, q, k=10, metric="ip", exact=exact)
            out.append((time.perf_counter() - t0, res["row_id"].tolist()))
        return out

    store.direction(LAYER, directions[0], k=10, metric="ip")          # load the exact index
    store.direction(LAYER, directions[0], k=10, metric="ip", exact=False)
    exact = run(picks, True, "nb") + run(directions, True, "dir")
    approx = run(picks, False, "nb") + run(directions, False, "dir")
    result["exact_p50_ms"] = p50([t for t, _ in exact])
    result["exact_p90_ms"] = round(float(np.percentile([t for t, _ in exact], 90)) * 1000, 3)
    result["approx_p50_ms"] = p50([t for t, _ in approx])
    result["approx_p90_ms"] = round(float(np.percentile([t for t, _ in approx], 90)) * 1000, 3)
    result["approx_recall_at_10"] = round(float(np.mean([len(set(a) & set(e)) / 10
                                                         for (_, a), (_, e) in zip(approx, exact)])), 4)
    result["n_queries"] = {"neighbours": len(picks), "class_directions": len(directions)}
    checks = [(directions[i], exact[len(picks) + i][1]) for i in range(3)] + \
             [(neighbour_vectors[i], None) for i in range(2)]
    verified = 0
    for q, got in checks:
        want = brute_force(vec_rows, vectors, q, 11)
        got = got if got is not None else store.direction(LAYER, q, k=11, metric="ip")["row_id"].tolist()
        verified += got == want[:len(got)]
    result["exact_verified_against_full_scan"] = f"{verified}/{len(checks)}"
    rnd_exact = run(random_dirs, True, "dir")
    rnd_approx = run(random_dirs, False, "dir")
    result["random_direction_exact_p50_ms"] = p50([t for t, _ in rnd_exact])
    result["random_direction_approx_recall_at_10"] = round(float(np.mean(
        [len(set(a) & set(e)) / 10 for (_, a), (_, e) in zip(rnd_approx, rnd_exact)])), 4)
    # the plain FAISS baseline: the store's exact index file (IndexIDMap2(IndexFlatIP)), as any user reads it
    faiss_flat = faiss.read_index(str(index_dir / "index-flat-ip" / "index.faiss"))
    it = iter(directions)
    t_flat, _ = timed(lambda: faiss_flat.search(np.asarray(next(it), np.float32)[None], 10), 5)
    result["faiss_flat_p50_ms"] = p50(t_flat)
    result["exact_speedup_vs_faiss_flat"] = round(result["faiss_flat_p50_ms"] / result["exact_p50_ms"], 1)
    result["load_average_1min"] = round(os.getloadavg()[0], 1)
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
    result["targets_met"] = {"topk_p50_le_1ms": result["topk_p50_ms"] <= 1.0,
                             "topk_speedup_ge_50x": result["topk_speedup_vs_pandas"] >= 50,
                             "exact_p50_le_100ms": result["exact_p50_ms"] <= 100,
                             "approx_p50_le_5ms": result["approx_p50_ms"] <= 5,
                             "approx_recall_ge_0.95": result["approx_recall_at_10"] >= 0.95}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
