"""Entry point: ``python -m pipeline [stage=...] [model=...] [data=...] [-m sweeps]``."""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from pipeline.app import is_multirun, run_job
from pipeline.config_check import hydra_entry
from pipeline.runtime import show


def print_summary(summary: dict) -> None:
    """Where the outputs are, what each stage did and what came from the cache (also in the log)."""
    lines = [f"\nrun folder: {summary['run_dir']}"]
    for name, result in summary["stages"].items():
        shown = ", ".join(f"{k}={v}" for k, v in result.items() if not isinstance(v, (dict, list)))
        lines.append(f"  {name}: {shown}")
    if "dataset" in summary:
        d = summary["dataset"]
        lines.append(f"  dataset {d['name']}: {d['images']} images, {d['quarantined']} quarantined")
    cache = summary.get("cache", {})
    hits = sum(v["hits"] for v in cache.values())
    misses = sum(v["misses"] for v in cache.values())
    detail = ", ".join(f"{k} {v['hits']}/{v['hits'] + v['misses']}" for k, v in cache.items())
    lines.append(f"  cache: {hits} hits, {misses} computed ({detail})")
    show("\n".join(lines))


@hydra_entry
def main(cfg: DictConfig) -> None:
    """Run the configured stages; exit 0, 1 (audit failed), 2 (user error) or 3 (internal error),
    with one line on stderr (:mod:`pipeline.app`). In a multirun a failed job records its status
    and returns, so the other jobs still run and the sweep summary reports it."""
    outcome = run_job(cfg)
    if outcome.summary is not None:
        print_summary(outcome.summary)
    if outcome.message:
        print(outcome.message, file=sys.stderr)
    if outcome.exit and not is_multirun():
        sys.exit(outcome.exit)


if __name__ == "__main__":
    main()
