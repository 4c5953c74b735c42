"""The stages, by name, and the loop that runs the configured ones.

Each stage module has ``run(ctx) -> dict`` which returns what it did for the run summary, and may
have ``check(cfg)``, which checks its settings before any stage of the run does work.
"""

from __future__ import annotations

import importlib
import time
from typing import Any

from omegaconf import DictConfig

from pipeline.config_check import check_config
from pipeline.errors import AuditFailed, PipelineError, suggest
from pipeline.runtime import Context

STAGES = ("train", "layers", "methods", "extract", "index", "dissect", "query", "explain", "visualize", "report", "audit")
# the stages that cannot run on a model without forward hooks (a TorchScript file), and why; in the
# others, the methods that need hooks say so themselves (NotApplicable)
NEEDS_HOOKS = {
    "extract": "records layer activations with forward hooks",
    "index": "indexes the layer activations that stage=extract records with forward hooks",
    "dissect": "records layer maps with forward hooks",
    "query": "reads the layer activations that stage=extract records with forward hooks",
    "visualize": "runs gradient ascent and deconvnet projections through forward hooks on a layer",
    "audit": "compares the layer activations that stage=extract records with forward hooks",
}


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


def check_hooks(ctx: Context, names: list[str]) -> None:
    """Refuse, before any stage runs, a run with a stage that needs hooks the model does not take."""
    blocked = [n for n in names if n in NEEDS_HOOKS]
    if blocked and not ctx.takes_hooks():
        raise PipelineError(f"stage={blocked[0]} {NEEDS_HOOKS[blocked[0]]}, which TorchScript modules do not take: "
                            "export the model with torch.export and load it with model=exported (README: Export "
                            "your model), or load the nn.Module itself (model=torchvision, model=timm).")


# the stages that read an activation store an earlier stage=extract must have written
NEEDS_STORE = ("index", "dissect", "query", "audit")


def check_store(ctx: Context, names: list[str]) -> None:
    """Before any work: a stage that reads the activation store, with no extract before it in this
    run, needs the store to exist. A built-in model that has not been trained here cannot have one,
    so that is said without training it first."""
    first = next((n for i, n in enumerate(names) if n in NEEDS_STORE and "extract" not in names[:i]), None)
    if first is None:
        return
    if ctx.cfg.model.source == "builtin" and not ctx.builtin_is_trained():
        raise PipelineError(f"stage={first} reads the activation store, and there is none yet: {ctx.cfg.model.name} "
                            "has not been trained here. Run `python -m pipeline stage=extract` first (it trains "
                            "the model, then stores its activations).")
    ctx.store()  # the one-line error naming the command when the store is missing


def run_stages(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured stages in order in one context; returns the run summary."""
    check_config(cfg)
    names = stage_names(cfg)
    ctx = Context(cfg)
    for name in names:  # a stage's own settings (``check(cfg)``) before any stage works
        check = getattr(importlib.import_module(f"pipeline.stages.{name}"), "check", None)
        if check is not None:
            check(cfg)
    check_hooks(ctx, names)
    check_store(ctx, names)
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
        failure.summary = summary
        raise failure
    return summary
