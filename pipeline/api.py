"""The pipeline from plain Python: run stages, get the models and datasets the stages use.

``run(["stage=extract", "model=efficientnet_lite0", "data=photos"])`` does what ``python -m
pipeline stage=extract model=efficientnet_lite0 data=photos`` does (one run, composed with Hydra's
compose API from the same configs, in a new run folder) and returns the run summary; it raises the
project's exceptions (:class:`~pipeline.errors.PipelineError`, :class:`~pipeline.errors.AuditFailed`)
instead of exiting. :func:`load_model` and :func:`load_dataset` return the bundles the stages use.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from pipeline.config_check import CONF_DIR


def hydra_value(value: Any) -> str:
    """A Python value as a Hydra override value (lists, None, booleans, strings with spaces)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value)
    return f"'{text}'" if any(c in text for c in " ,[]{}=") else text


def settings_overrides(group: str, name: str | None, settings: dict[str, Any]) -> list[str]:
    """``group=name`` and ``++group.key=value`` for each setting."""
    return ([f"{group}={name}"] if name else []) + [f"++{group}.{k}={hydra_value(v)}" for k, v in settings.items()]


def compose_run(overrides: Sequence[str] = ()) -> DictConfig:
    """The run's config as ``@hydra.main`` would give it, with its run folder created and Hydra's
    run-time config set (the stages read the run folder from it)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    run_dir = Path(str(OmegaConf.select(cfg, "hydra.run.dir")))
    run_dir.mkdir(parents=True, exist_ok=True)
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir.resolve())
        cfg.hydra.job.name = "pipeline"
    HydraConfig().set_config(cfg)
    return cfg


def run(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run the stages the overrides choose (as the command line does, one run) and return the run
    summary (``summary.json``); raises PipelineError / AuditFailed instead of exiting."""
    from pipeline.stages import run_stages

    return run_stages(compose_run(overrides))


def load_model(name: str | None = None, overrides: Sequence[str] = (), **settings: Any) -> Any:
    """The :class:`~pipeline.models.ModelBundle` the stages use (module, transform, class names,
    key): ``load_model("torchvision", arch="resnet18")``; a built-in model is trained first when no
    trained copy is cached. ``overrides`` are any other config overrides (``paths.outputs=...``)."""
    from pipeline.runtime import Context

    return Context(compose_run([*settings_overrides("model", name, settings), *overrides])).model


def load_dataset(name: str | None = None, overrides: Sequence[str] = (), **settings: Any) -> Any:
    """The :class:`~pipeline.data.sources.DatasetBundle` the stages use (its records table:
    image_id, path, label, split, boxes): ``load_dataset("imagefolder", path="~/pets")``."""
    from pipeline.runtime import Context

    return Context(compose_run([*settings_overrides("data", name, settings), *overrides])).dataset
