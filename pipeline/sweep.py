"""Sweep summaries: a Hydra callback that ends a multirun with one table across its jobs.

At the end of ``python -m pipeline -m ...`` it reads each job's ``status.json``, ``summary.json`` and
``.hydra/overrides.yaml`` from the sweep folder and writes ``<sweep dir>/sweep_summary.csv`` (one
row per job: its status, exit status and error line, its overrides and every scalar of its summary,
dotted: ``stages.train.test_accuracy``)
and ``<sweep dir>/sweep.html`` (the same table, with the settings shared by every job pulled out
and links to each job's report). When a job did not succeed it names it on stderr and the sweep
exits with the highest exit status of its jobs (:mod:`pipeline.app`). Enabled in ``conf/config.yaml``::

    hydra:
      callbacks:
        sweep_summary:
          _target_: pipeline.sweep.SweepSummary
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipeline.app import INTERNAL_ERROR, STATUS_FILE
from pipeline.cache import atomic_write_bytes
from pipeline.report.data import read_json
from pipeline.report.html import Raw, Section, facts, link, note, page, table

CSV_NAME = "sweep_summary.csv"
HTML_NAME = "sweep.html"
MAX_DEPTH = 4
MAX_LIST = 10


def flatten(obj: Any, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, Any]]:
    """Dotted keys and scalar values of nested dicts; short lists of scalars are joined with commas."""
    if isinstance(obj, dict):
        if depth >= MAX_DEPTH:
            return
        for k, v in obj.items():
            yield from flatten(v, f"{prefix}.{k}" if prefix else str(k), depth + 1)
    elif isinstance(obj, list):
        if len(obj) <= MAX_LIST and all(isinstance(v, (str, int, float, bool)) or v is None for v in obj):
            yield prefix, ",".join("" if v is None else str(v) for v in obj)
    else:
        yield prefix, obj


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The jobs' folders: those holding Hydra's ``.hydra/overrides.yaml`` or a ``summary.json``,
    one or two levels below the sweep folder, in job order (numeric names sorted as numbers)."""
    found = {p.parents[1] for pattern in ("*/.hydra/overrides.yaml", "*/*/.hydra/overrides.yaml")
             for p in sweep_dir.glob(pattern)}
    found |= {p.parent for pattern in ("*/summary.json", "*/*/summary.json") for p in sweep_dir.glob(pattern)}

    def order(p: Path) -> tuple[Any, ...]:
        rel = p.relative_to(sweep_dir).parts
        return tuple((0, int(x), "") if x.isdigit() else (1, 0, x) for x in rel)
    return sorted(found, key=order)


def job_overrides(job: Path) -> list[str]:
    """The job's command-line overrides as Hydra recorded them (empty when it recorded none)."""
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    return [str(o) for o in OmegaConf.load(path) or []]


def summarize_sweep(sweep_dir: Path) -> pd.DataFrame:
    """One row per job: job, status, overrides, one column per override key, seconds, then the
    flattened scalars of its ``summary.json``."""
    rows = []
    for job in job_dirs(sweep_dir):
        overrides = job_overrides(job)
        row: dict[str, Any] = {"job": job.relative_to(sweep_dir).as_posix(), "overrides": " ".join(overrides)}
        for o in overrides:
            key, sep, value = o.partition("=")
            if sep:
                row[f"override:{key.lstrip('+~')}"] = value
        status = read_json(job / STATUS_FILE) or {}
        row["status"] = status.get("status", "no status.json (still running, or killed)")
        row["exit"] = status.get("exit")
        row["message"] = status.get("message", "")
        summary = read_json(job / "summary.json")
        if summary is not None:
            stages = summary.get("stages") or {}
            row["seconds"] = round(sum(float(r.get("seconds", 0) or 0) for r in stages.values()), 2)
            cache = summary.get("cache") or {}
            row["cache.hits"] = sum(int(v.get("hits", 0)) for v in cache.values())
            row["cache.misses"] = sum(int(v.get("misses", 0)) for v in cache.values())
            for key in ("dataset", "model", "stages"):
                row.update(flatten(summary.get(key) or {}, key))
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=["job", "status", "exit", "message", "overrides"])
    first = ["job", "status", "exit", "message", "overrides", *[c for c in df.columns if c.startswith("override:")]]
    return df[first + [c for c in df.columns if c not in first]]


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _shown(value: Any) -> bool:
    """Values worth a column on the page: not absolute paths (they stay in the CSV)."""
    return not (isinstance(value, str) and os.path.isabs(value))


def _clip(value: Any, width: int = 32) -> Any:
    """Long strings (content keys) cut for the page; the CSV keeps them whole."""
    return value[: width - 1] + "…" if isinstance(value, str) and len(value) > width else value


def sweep_page(sweep_dir: Path, df: pd.DataFrame) -> str:
    """The sweep's page: counts, settings shared by every job, and the table of what differs."""
    ok = int((df["status"] == "ok").sum()) if len(df) else 0
    parts = [facts({"sweep folder": str(sweep_dir), "jobs": len(df), "succeeded": ok, "failed or missing": len(df) - ok})]
    if df.empty:
        parts.append(note("No job folders found in the sweep folder."))
        return page(f"Sweep {sweep_dir.name}", str(sweep_dir), [Section("jobs", "Jobs", Raw("".join(parts)))])
    fixed_cols = ["job", "status", "exit", "message", "overrides"]  # overrides: one column per key instead
    same, varying = {}, []
    for c in df.columns:
        if c in fixed_cols:
            continue
        values = [v for v in df[c].tolist() if not _blank(v)]
        if not values or not all(_shown(v) for v in values):
            continue
        everywhere = len(values) in (len(df), ok)  # in every job, or in every finished one
        if len(df) > 1 and everywhere and len({str(v) for v in values}) == 1:
            same[c] = values[0]
        else:
            varying.append(c)
    rows = []
    for r in df.to_dict("records"):
        job = str(r["job"])
        report = f"{job}/report.html" if (sweep_dir / job / "report.html").is_file() else None
        cells: list[Any] = [link(report, job) if report else job, r["status"], r.get("message") or ""]
        cells += [None if _blank(r.get(c)) else _clip(r.get(c)) for c in varying]
        rows.append(cells)
    parts.append(Raw('<div class="scroll">') + table(["job", "status", "message", *varying], rows) + Raw("</div>"))
    sections = [Section("jobs", "Jobs", Raw("".join(parts)))]
    if same:
        sections.append(Section("same", "Same in every job", facts({k: _clip(v, 80) for k, v in same.items()})))
    sections.append(Section("csv", "Data", Raw(f'<p>Every value of every job: {link(CSV_NAME, CSV_NAME)}</p>')))
    return page(f"Sweep {sweep_dir.name}", str(sweep_dir), sections)


def write_sweep_summary(sweep_dir: Path, csv_name: str = CSV_NAME, html_name: str = HTML_NAME
                        ) -> tuple[Path, Path, pd.DataFrame]:
    """Write the sweep's CSV and page; returns their paths and the table (one row per job)."""
    df = summarize_sweep(sweep_dir)
    csv_path, html_path = sweep_dir / csv_name, sweep_dir / html_name
    atomic_write_bytes(csv_path, df.to_csv(index=False).encode("utf-8"))
    atomic_write_bytes(html_path, sweep_page(sweep_dir, df).encode("utf-8"))
    return csv_path, html_path, df


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, summarise its jobs (see the module docstring)."""

    def __init__(self, csv: str = CSV_NAME, html: str = HTML_NAME) -> None:
        self.csv = csv
        self.html = html

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            print(f"sweep summary: no sweep folder at {sweep_dir}; nothing to summarise")
            return
        csv_path, html_path, df = write_sweep_summary(sweep_dir, self.csv, self.html)
        n = len(df)
        print(f"\nsweep summary ({n} jobs): {csv_path}\n  page: {html_path}")
        failed = df[df["status"] != "ok"]
        for r in failed.itertuples(index=False):
            print(f"  job {r.job}: {r.message if isinstance(r.message, str) and r.message else r.status}",
                  file=sys.stderr)
        if len(failed):
            codes = pd.to_numeric(failed["exit"], errors="coerce").fillna(INTERNAL_ERROR)
            print(f"{len(failed)} of {n} jobs did not succeed", file=sys.stderr)
            sys.exit(int(codes.max()))
