"""stage=train: train the built-in model on clutter digits and cache the checkpoint and metrics.

The training itself is :mod:`pipeline.models.training` (the loop and the cached checkpoint of a
recipe); other stages train a missing built-in model on first use through the same call.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import PipelineError
from pipeline.runtime import Context, show


def run(ctx: Context) -> dict[str, Any]:
    """Train (or fetch) the configured built-in model; other model sources have nothing to train."""
    if ctx.cfg.model.source != "builtin":
        if ctx.cfg.stage == "train":
            raise PipelineError(f"model={ctx.cfg.model.name} is not trainable here: stage=train trains the "
                                "built-in models (model=digits_cnn or model=digits_cnn_fc).")
        return {"skipped": "not a built-in model"}
    trained = ctx.trained_builtin
    metrics = trained.metrics
    show(f"{ctx.cfg.model.arch}: test accuracy {metrics['test_accuracy']:.3f} "
         f"({'trained now' if trained.trained_now else 'from the cache'}: {metrics['checkpoint']})")
    return {"model": ctx.model.name, "key": ctx.model.key, "trained_now": trained.trained_now,
            "test_accuracy": metrics["test_accuracy"], "train_seconds": round(metrics["train_seconds"], 1),
            "checkpoint": metrics["checkpoint"]}
