"""stage=train: train the built-in model on clutter digits and cache the checkpoint and metrics."""

from __future__ import annotations

from typing import Any

from pipeline.errors import PipelineError
from pipeline.runtime import Context


def run(ctx: Context) -> dict[str, Any]:
    """Train (or fetch) the configured built-in model; other model sources have nothing to train."""
    if ctx.cfg.model.source != "builtin":
        if ctx.cfg.stage == "train":
            raise PipelineError(f"model={ctx.cfg.model.name} is not trainable here: stage=train trains the "
                                "built-in models (model=digits_cnn or model=digits_cnn_fc).")
        return {"skipped": "not a built-in model"}
    metrics = ctx.model.meta["training"]
    return {"model": ctx.model.name, "key": ctx.model.key,
            "test_accuracy": metrics["test_accuracy"], "train_seconds": round(metrics["train_seconds"], 1),
            "checkpoint": metrics["checkpoint"]}
