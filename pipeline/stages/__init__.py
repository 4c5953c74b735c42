"""The stages, by name, and the loop that runs the configured ones.

Each stage module has ``run(ctx) -> dict`` which returns what it did for the run summary.
"""

from __future__ import annotations

import importlib
import time
from typing import Any

from omegaconf import DictConfig

from pipeline.audit import AuditFailed
from pipeline.errors import PipelineError, suggest
from pipeline.runtime import Context

STAGES = ("train", "layers", "methods", "extract", "index", "query", "explain", "visualize", "report", "audit")


def stage_names(cfg: DictConfig) -> list[str]:
    """The stages to run: a name, a list (``stage=[extract,index]``), or ``all`` (the default list)."""
    stage = cfg.stage
    if isinstance(stage, str):
        names = list(cfg.pipeline) if stage == "all" else [stage]
    else:
        names = [str(s) for s in stage]
    for n in names:
        if n not in STAGES:
            raise PipelineError(f"unknown stage '{n}'.{suggest(n, STAGES)} Stages: {', '.join(STAGES)}, or all.")
    return names


def run_stages(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured stages in order in one context; returns the run summary."""
    names = stage_names(cfg)
    ctx = Context(cfg)
    failure: AuditFailed | None = None
    for name in names:
        start = time.perf_counter()
        try:
            result = importlib.import_module(f"pipeline.stages.{name}").run(ctx)
        except AuditFailed as e:  # the remaining stages (the report) still run; re-raised at the end
            failure, result = e, dict(e.result)
        result["seconds"] = round(time.perf_counter() - start, 2)
        ctx.summary["stages"][name] = result
    summary = ctx.finish()
    if failure is not None:
        raise failure
    return summary
