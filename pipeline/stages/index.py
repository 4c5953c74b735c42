"""stage=index: merge extraction shards into the store, then build one FAISS index per layer.

After a sharded extract (``shard=i num_shards=n``, e.g. SLURM array jobs) the merge happens only
once every shard has written its images: an early run names the shards that have not finished
(and their jobs) instead of merging a partial store, or waits for them with ``index.wait=true``.
Indexes are rebuilt only when the store changed since they were built.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from pipeline.errors import PipelineError
from pipeline.runtime import Context
from pipeline.store import ActivationStore

log = logging.getLogger(__name__)


def unfinished(status: dict[str, Any]) -> str:
    """One line naming the shards that have not written all their images, and their jobs."""
    n, missing, jobs = status["num_shards"], status["missing"], status["jobs"]
    shards = ", ".join(str(s) for s in sorted(missing))
    images = sum(missing.values())
    named = [f"{s}: {jobs[s]['slurm_job']}" for s in sorted(missing) if jobs.get(s, {}).get("slurm_job")]
    where = f" (SLURM jobs {', '.join(named)})" if named else ""
    first = min(missing)
    return (f"{len(missing)} of {n} shards have not finished: shard {shards}{where}, {images} images still to "
            f"extract. Wait for them (index.wait=true waits), or run a missing one again with "
            f"`python -m pipeline stage=extract shard={first} num_shards={n}`; nothing was merged.")


def wait_for_shards(store: ActivationStore, records: pd.DataFrame, timeout_s: float, poll_s: float,
                    wait: bool) -> dict[str, Any]:
    """The store's shard status once no shard is missing images; a PipelineError naming the
    unfinished shards when ``wait`` is off or ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    status = store.shard_status(records)
    while status["missing"]:
        if not wait or time.monotonic() >= deadline:
            waited = f" after waiting {timeout_s:.0f} s" if wait else ""
            raise PipelineError(f"stage=index{waited}: {unfinished(status)}")
        log.info("index: waiting for %d shard(s): %s", len(status["missing"]), unfinished(status))
        time.sleep(max(0.1, min(poll_s, deadline - time.monotonic())))
        status = store.shard_status(records)
    return status


def run(ctx: Context) -> dict[str, Any]:
    """Wait for (or name) unfinished shards, merge them, then build the exact index (and an
    approximate one for large N)."""
    cfg = ctx.cfg.index
    store = ctx.store()
    records = ctx.store_records()
    shards = wait_for_shards(store, records, float(cfg.wait_timeout_s), float(cfg.poll_s), bool(cfg.wait))
    info = store.finalize(records)
    n_rows = int(store.images().shape[0])
    kinds = ["flat"]
    approx = str(cfg.approximate)
    if approx in ("ivf", "hnsw") or (approx == "auto" and n_rows >= int(cfg.approximate_min_rows)):
        kinds.append("hnsw" if approx == "auto" else approx)
    built: dict[str, list[str]] = {}
    todo = [(layer, str(metric), kind) for layer in store.layers() for metric in cfg.metrics for kind in kinds]
    for layer, metric, kind in tqdm(todo, desc="index", unit="index", disable=None if ctx.progress else True):
        result = store.build_index(layer, kind=kind, metric=metric, **dict(cfg.get(kind) or {}))
        if result.get("built"):
            built.setdefault(layer, []).append(f"{kind}/{metric}")
    return {"generation": store.generation, "n_images": n_rows, "merged_shards": shards["num_shards"] or 0,
            "merged_changes": bool(info.get("changed", False)),
            "indexes_built": sum(len(v) for v in built.values()), "layers": len(store.layers())}
