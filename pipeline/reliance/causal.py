"""Background-reliance audit (Xiao et al. 2020): partners for the mixed variants, and per-class
retentions on the object / context variants with a flag for classes decided from the background.

A class whose correctly classified images lose their label once the background is removed
(low ``object_only`` retention), or keep it once the object is removed (high ``context_only``
retention), far more than the other classes' images do, is flagged by the robust rule of
:mod:`pipeline.reliance.robust`. The mixed variants give ``bg_gap`` = accuracy with a background of
the same class minus accuracy with a background of another class: how much the background alone
is worth.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.reliance.robust import describe_rule, far_from_others
from pipeline.errors import PipelineError

VARIANT_COLUMNS = ("object_only", "context_only", "mixed_same", "mixed_rand")
COLUMNS = ("class_name", "images", "accuracy", "object_only_retention", "context_only_retention",
           "mixed_same", "mixed_rand", "bg_gap", "flagged", "reason")


def choose_partners(labels: np.ndarray, same: bool, seed: int) -> np.ndarray:
    """For each image the index (N,) of a random other image of the same class (``same``) or of
    another class; -1 where none exists. Never the image itself; the same for the same seed."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise PipelineError(f"choose_partners needs labels of shape (N,), got {labels.shape}.")
    n = len(labels)
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    partners = np.full(n, -1, dtype=np.int64)
    for start, count in zip(starts, counts):
        members = order[start:start + count]
        pool = count - 1 if same else n - count
        if pool == 0:
            continue
        r = rng.integers(0, pool, size=count)
        if same:  # skip the image's own position in its class
            pos = start + r + (r >= np.arange(count))
        else:  # skip the class's block in the sorted order
            pos = r + count * (r >= start)
        partners[members] = order[pos]
    return partners


def _numbers(column: pd.Series) -> np.ndarray:
    """A prediction column as float64, NA -> NaN."""
    return pd.to_numeric(column).to_numpy(dtype=np.float64, na_value=np.nan)


def _rate(hits: np.ndarray, over: np.ndarray) -> float:
    """Fraction of ``hits`` among the rows in ``over``; NaN when there are none."""
    return float(hits[over].mean()) if over.any() else float("nan")


def _row(name: str, label: np.ndarray, pred: np.ndarray, variants: dict[str, np.ndarray]) -> dict:
    """One table row for the images given."""
    correct = pred == label
    row = {"class_name": name, "images": len(label), "accuracy": _rate(correct, np.ones_like(correct))}
    for col, v in variants.items():
        valid = np.isfinite(v) & (v >= 0)
        hit = v == label
        if col in ("object_only", "context_only"):
            row[f"{col}_retention"] = _rate(hit, correct & valid)
        else:
            row[col] = _rate(hit, valid)
    row["bg_gap"] = row["mixed_same"] - row["mixed_rand"]
    return row


def causal_table(df: pd.DataFrame, k: float = 3.0, min_gap: float = 0.1) -> pd.DataFrame:
    """One row per class (by label) and a last "(all)" row over every image: accuracy, retention
    of the correct images on the object_only / context_only variants, accuracy on the mixed
    variants (over the images with a partner), bg_gap, and the background-reliance flag."""
    needed = ("class_name", "label", "prediction") + VARIANT_COLUMNS
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise PipelineError(f"causal_table needs the columns {', '.join(missing)}; pass one row per "
                            f"image with {', '.join(needed)}.")
    label, pred = _numbers(df["label"]), _numbers(df["prediction"])
    if not (np.isfinite(label).all() and np.isfinite(pred).all()):
        raise PipelineError("causal_table got rows without a label or a full-image prediction; "
                            "drop them or predict on them first.")
    variants = {c: _numbers(df[c]) for c in VARIANT_COLUMNS}
    names = df["class_name"].astype(str).to_numpy()

    rows = []
    for value in np.unique(label):
        at = label == value
        rows.append(_row(names[at][0], label[at], pred[at], {c: v[at] for c, v in variants.items()}))
    obj = np.array([r["object_only_retention"] for r in rows], dtype=np.float64)
    ctx = np.array([r["context_only_retention"] for r in rows], dtype=np.float64)
    low, low_limit = far_from_others(obj, k, min_gap, "below")
    high, high_limit = far_from_others(ctx, k, min_gap, "above")
    for i, row in enumerate(rows):
        reasons = []
        if low[i]:
            reasons.append(f"object_only retention {obj[i]:.2f}, below {low_limit[i]:.2f} "
                           "(the other classes' median minus the spread)")
        if high[i]:
            reasons.append(f"context_only retention {ctx[i]:.2f}, above {high_limit[i]:.2f} "
                           "(the other classes' median plus the spread)")
        row["flagged"], row["reason"] = bool(reasons), "; ".join(reasons)
    rows.append(_row("(all)", label, pred, variants) | {"flagged": False, "reason": ""})
    return pd.DataFrame(rows, columns=list(COLUMNS)).astype({"images": int, "flagged": bool})


def describe_rules(k: float, min_gap: float) -> str:
    """The flag rule in words, for the report and the config."""
    return ("A class is flagged when the share of its correctly classified images still predicted "
            "as their label is, on object_only (background filled), "
            f"{describe_rule(k, min_gap, 'below')}, or, on context_only (object filled), "
            f"{describe_rule(k, min_gap, 'above')}.")
