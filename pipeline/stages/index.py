"""stage=index: merge extraction shards into the store, then build one FAISS index per layer.

Indexes are rebuilt only when the store changed since they were built.
"""

from __future__ import annotations

from typing import Any

from pipeline.runtime import Context


def run(ctx: Context) -> dict[str, Any]:
    """Finalize pending shards, then build the exact index (and an approximate one for large N)."""
    cfg = ctx.cfg.index
    store = ctx.store()
    info = store.finalize(ctx.store_records())
    n_rows = int(store.images().shape[0])
    kinds = ["flat"]
    approx = str(cfg.approximate)
    if approx in ("ivf", "hnsw") or (approx == "auto" and n_rows >= int(cfg.approximate_min_rows)):
        kinds.append("hnsw" if approx == "auto" else approx)
    built: dict[str, list[str]] = {}
    for layer in store.layers():
        for metric in cfg.metrics:
            for kind in kinds:
                params = dict(cfg.get(kind) or {})
                result = store.build_index(layer, kind=kind, metric=str(metric), **params)
                if result.get("built"):
                    built.setdefault(layer, []).append(f"{kind}/{metric}")
    return {"generation": store.generation, "n_images": n_rows,
            "merged_changes": bool(info.get("changed", False)),
            "indexes_built": sum(len(v) for v in built.values()), "layers": len(store.layers())}
