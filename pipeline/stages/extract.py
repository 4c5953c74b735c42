"""stage=extract: per-layer activation statistics and predictions of every image, into the store.

Incremental: only images the store lacks (new or changed) go through the model. Sharded:
``shard=i num_shards=n`` processes a deterministic part of the dataset; ``stage=index`` merges.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pipeline.data.loader import record_loader
from pipeline.methods.activations import record_stats
from pipeline.runtime import Context

log = logging.getLogger(__name__)


@torch.no_grad()
def extract_chunk(ctx: Context, chunk: pd.DataFrame, layers: list[str], bar: tqdm) -> tuple[dict, dict]:
    """Forward one chunk of images; returns per-layer stats and predictions as numpy arrays."""
    cfg = ctx.cfg.extract
    model = ctx.model
    per_layer: dict[str, dict[str, list]] = {name: {"max": [], "mean": [], "argmax": []} for name in layers}
    hw: dict[str, tuple[int, int]] = {}
    logits_all = []
    batch_size = int(cfg.batch_size)
    loader = record_loader(chunk, model.transform, batch_size, int(cfg.num_workers))
    with record_stats(model.module, layers) as rec:
        for x, _ in loader:
            n = len(x)
            if n < batch_size:
                # Zero-pad a short batch: oneDNN chooses its conv algorithm by batch size, and a short
                # batch (whose size depends on sharding or on where a killed run resumes) could
                # change the last bits; full batches keep every store bit-identical.
                x = torch.cat([x, x.new_zeros((batch_size - n, *x.shape[1:]))])
            logits_all.append(model.module(x.to(ctx.device))[:n].float().cpu())
            for name in layers:
                mx, mean, arg, hw[name] = rec[name]
                per_layer[name]["max"].append(mx[:n].cpu())
                per_layer[name]["mean"].append(mean[:n].cpu())
                per_layer[name]["argmax"].append(arg[:n].cpu())
            bar.update(n)
    layer_arrays = {name: {k: torch.cat(v).numpy() for k, v in d.items()} | {"hw": hw[name]}
                    for name, d in per_layer.items()}
    logits = torch.cat(logits_all)
    probs = logits.softmax(1)
    k = min(5, logits.shape[1])
    top_scores, top_ids = probs.topk(k, dim=1)
    labels = chunk["label"].to_numpy(dtype="float64", na_value=np.nan)
    true_score = np.full(len(chunk), np.nan, dtype=np.float32)
    ok = ~np.isnan(labels)
    true_score[ok] = logits[torch.as_tensor(np.flatnonzero(ok)), torch.as_tensor(labels[ok].astype(np.int64))].numpy()
    preds = {"prediction": logits.argmax(1).numpy(), "top5_ids": top_ids.numpy().astype(np.int32),
             "top5_scores": top_scores.numpy().astype(np.float32), "true_score": true_score}
    return layer_arrays, preds


def current_job() -> dict[str, Any]:
    """What runs this shard: the SLURM job (``<array job>_<task>`` for an array task) when there is
    one, and the host and process, so that stage=index can name a shard's job."""
    env = os.environ
    array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    job = f"{array}_{task}" if array and task else env.get("SLURM_JOB_ID")
    return {"slurm_job": job, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}


def run(ctx: Context) -> dict[str, Any]:
    """Extract the configured layers for the images the store lacks; finalize when unsharded."""
    cfg = ctx.cfg.extract
    shard, num_shards = int(ctx.cfg.shard), int(ctx.cfg.num_shards)
    layers = ctx.layers(cfg.layers)
    model = ctx.model
    model.module.eval()
    store = ctx.store(create=True)
    records = ctx.store_records()
    plan = store.plan(records, layers, shard=shard, num_shards=num_shards, job=current_job())
    log.info("extract: %d of %d images in shard %d/%d need the model (%d already stored)",
             len(plan), plan.n_in_shard, shard, num_shards, plan.n_done)
    start = time.perf_counter()
    # Each part is written by a background thread while the model runs on the next chunk (Parquet
    # encoding and the top-K merge release the GIL); at most one write is in flight, in order.
    with tqdm(total=len(plan), desc="extract", unit="img", disable=None if ctx.progress else True) as bar, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="plan_write") as writer:
        pending: Future | None = None
        for chunk in plan.chunks(int(cfg.part_size)):
            layer_arrays, preds = extract_chunk(ctx, chunk, layers, bar)
            if pending is not None:
                pending.result()
            pending = writer.submit(plan.write, chunk, layer_arrays, preds)
        if pending is not None:
            pending.result()
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {"layers": layers, "processed": len(plan), "skipped": plan.n_done,
                              "images_per_s": round(len(plan) / seconds, 1) if len(plan) else None,
                              "store": str(store.root)}
    if num_shards == 1:
        info = store.finalize(records)
        result.update({k: info[k] for k in ("generation", "n_images", "added", "removed") if k in info})
    else:
        result["note"] = f"shard {shard} of {num_shards} written; run stage=index to merge the shards"
    return result
