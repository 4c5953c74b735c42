"""Entry point: ``python -m pipeline [stage=...] [model=...] [data=...] [-m sweeps]``."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from pipeline.audit import AuditFailed
from pipeline.errors import PipelineError
from pipeline.stages import run_stages

log = logging.getLogger("pipeline")


def print_summary(summary: dict) -> None:
    """Where the outputs are, what each stage did and what came from the cache."""
    print(f"\nrun folder: {summary['run_dir']}")
    for name, result in summary["stages"].items():
        shown = ", ".join(f"{k}={v}" for k, v in result.items() if not isinstance(v, (dict, list)))
        print(f"  {name}: {shown}")
    if "dataset" in summary:
        d = summary["dataset"]
        print(f"  dataset {d['name']}: {d['images']} images, {d['quarantined']} quarantined")
    cache = summary.get("cache", {})
    hits = sum(v["hits"] for v in cache.values())
    misses = sum(v["misses"] for v in cache.values())
    detail = ", ".join(f"{k} {v['hits']}/{v['hits'] + v['misses']}" for k, v in cache.items())
    print(f"  cache: {hits} hits, {misses} computed ({detail})")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Run the configured stages; a failed audit exits with status 1, a user error with status 2,
    each with one line on stderr."""
    try:
        summary = run_stages(cfg)
    except AuditFailed as e:
        print(e, file=sys.stderr)
        sys.exit(1)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print_summary(summary)


if __name__ == "__main__":
    main()
