"""What the report reads: other stages' outputs in the run folder, and the plain data it shows.

Each reader returns None when its stage did not run in this run folder, so each section can say
so instead of failing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


@dataclass
class Overview:
    """The dataset and model summary: names, counts, accuracy, quarantined files, the run's stages."""

    dataset: dict[str, Any]
    model: dict[str, Any]
    splits: pd.DataFrame | None = None       # split, images, labelled, correct, accuracy
    per_class: pd.DataFrame | None = None    # class, name, images, accuracy
    accuracy_note: str = ""
    quarantine: pd.DataFrame | None = None   # path, reason
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class StoreNeuron:
    """One neuron's top images from the activation store and their receptive-field crops (PNG files)."""

    layer: str
    channel: int
    paths: list[str]
    captions: list[str]
    crops: list[str]
    value: float


@dataclass
class SanityResult:
    """One method's sanity checks (see :mod:`pipeline.report.sanity`) and its verdict."""

    method: str
    status: str                      # pass | fail | n/a
    reason: str
    images: int = 0
    layers: list[str] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)   # mean Spearman after randomising layers[:i+1]
    final_spearman: float = float("nan")
    class_spearman: float = float("nan")
    class_rel_l2: float = float("nan")
    randomization_ok: bool | None = None
    class_ok: bool | None = None
    strip: str | None = None         # PNG: the first image's map, then the map after each step
    input_spearman: float = float("nan")   # mean Spearman between different images' maps, same class
    input_ok: bool | None = None


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file, or None when it is missing or unreadable (logged)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        log.warning("report: cannot read %s: %s", path, e)
        return None


def read_parquet(path: Path) -> pd.DataFrame | None:
    """A Parquet table, or None when it is missing or unreadable (logged)."""
    if not path.is_file():
        return None
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as e:
        log.warning("report: cannot read %s: %s", path, e)
        return None


def read_explain(run_dir: Path) -> tuple[pd.DataFrame | None, dict[str, Any] | None]:
    """stage=explain's table (one row per image x method) and its metrics."""
    folder = run_dir / "explain"
    return read_parquet(folder / "artifacts.parquet"), read_json(folder / "metrics.json")


def read_visualize(run_dir: Path) -> tuple[pd.DataFrame | None, dict[str, Any] | None]:
    """stage=visualize's index of pictures (kind ascent / deconv / guided / class) and its
    projections' input-dependence summary (``projections.json``)."""
    folder = run_dir / "visualize"
    return read_parquet(folder / "index.parquet"), read_json(folder / "projections.json")


def read_audit(run_dir: Path) -> tuple[str | None, dict[str, Any] | None]:
    """stage=audit's HTML fragment and its audit.json."""
    folder = run_dir / "audit"
    fragment = folder / "section.html"
    text = fragment.read_text(encoding="utf-8") if fragment.is_file() else None
    return text, read_json(folder / "audit.json")


def read_reliance(run_dir: Path, audit: dict[str, Any] | None) -> tuple[dict[str, Any] | None, str]:
    """The per-class reliance of a whole split: the explain stage's (``explain.select.all``), else
    the audit's; and where it came from."""
    section = read_json(run_dir / "explain" / "reliance.json")
    if section is not None:
        return section, "stage=explain with explain.select.all=true"
    if audit is not None and (audit.get("reliance") or {}).get("per_class") is not None:
        return audit["reliance"], "stage=audit"
    return None, ""


def read_quarantine(run_dir: Path) -> pd.DataFrame | None:
    """The run's quarantined files (path, reason), or None when the dataset was not loaded."""
    path = run_dir / "quarantine.csv"
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.EmptyDataError):
        return pd.DataFrame({"path": [], "reason": []})


def accuracy_tables(images: pd.DataFrame, class_names: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Accuracy per split (plus 'all') and per class (by label) from the store's images table."""
    df = images[["split", "label", "prediction"]].copy()
    df["split"] = df["split"].astype(str)
    labelled = df[df["label"].notna() & df["prediction"].notna()]
    correct = (labelled["label"].astype("int64") == labelled["prediction"].astype("int64"))
    rows = []
    for split in [*sorted(df["split"].unique()), "all"]:
        mask_all = df["split"] == split if split != "all" else np.ones(len(df), dtype=bool)
        mask = labelled["split"] == split if split != "all" else np.ones(len(labelled), dtype=bool)
        n_lab = int(np.sum(mask))
        n_ok = int(correct[mask].sum()) if n_lab else 0
        rows.append({"split": split, "images": int(np.sum(mask_all)), "labelled": n_lab, "correct": n_ok,
                     "accuracy": n_ok / n_lab if n_lab else float("nan")})
    splits = pd.DataFrame(rows)
    per = labelled.assign(correct=correct.to_numpy()).groupby(labelled["label"].astype("int64"))["correct"]
    per_class = pd.DataFrame({"images": per.size(), "accuracy": per.mean()}).reset_index(names="class")
    per_class["name"] = [class_names[c] if 0 <= c < len(class_names) else str(c) for c in per_class["class"]]
    return splits, per_class[["class", "name", "images", "accuracy"]]
