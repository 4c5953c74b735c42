"""Per-class reliance: is the model looking at the object? Pure functions over score tables.

A *scores table* has one row per image x method (from :class:`pipeline.explaining.SplitExplainer`)
with ``image_id``, ``class`` (the label, else the prediction), ``method``, ``inside_energy`` (share
of positive attribution inside the object, NaN without one), ``pointing_hit``, ``box_iou``,
``deletion_auc`` and ``insertion_auc``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline.reliance.robust import describe_rule, far_from_others
from pipeline.reliance.spray import describe_rule as describe_spray
from pipeline.reliance.spray import find_strategies


@dataclass(frozen=True)
class Rules:
    """The flag rules: in-object energy far below the other classes', and SpRAy's second strategy."""

    outside_share: float = 0.5   # an image "looks outside" when less than this share is inside the object
    k: float = 3.0
    min_gap: float = 0.1
    min_images: int = 5          # classes with fewer scored images are not flagged on energy
    spray: Mapping[str, Any] | None = None

    def text(self) -> str:
        if self.spray is not None:
            s = {"max_fraction": 0.35, "min_size": 3, "min_away": 0.5, "rest_level": 0.2, "min_gap_ratio": 0.75,
                 **dict(self.spray)}
            second = "a second strategy: " + describe_spray(s["max_fraction"], s["min_size"], s["min_away"],
                                                            s["rest_level"], s["min_gap_ratio"])
        else:
            second = "a second strategy (off)"
        return (f"A class is flagged when its mean in-object energy lies {describe_rule(self.k, self.min_gap)} "
                f"(classes with at least {self.min_images} images with an object), or when its maps form {second}. "
                f"An image looks outside the object when less than {self.outside_share:g} of its positive "
                "attribution lies inside it.")


def class_table(scores: pd.DataFrame, class_names: Sequence[str], rules: Rules) -> pd.DataFrame:
    """One row per (class, method): images, images with an object, mean in-object energy, pointing
    rate, fraction looking outside, mean box IoU and curve AUCs; ``energy_flag`` under the rule."""
    rows = []
    for (method, c), g in scores.groupby(["method", "class"], sort=True):
        e = g["inside_energy"].dropna()
        rows.append({"class": int(c), "class_name": class_names[int(c)], "method": method, "images": len(g),
                     "with_object": len(e), "inside_energy": e.mean() if len(e) else np.nan,
                     "pointing": g["pointing_hit"].dropna().mean() if len(e) else np.nan,
                     "outside_fraction": float((e < rules.outside_share).mean()) if len(e) else np.nan,
                     "box_iou": g["box_iou"].mean(), "deletion_auc": g["deletion_auc"].mean(),
                     "insertion_auc": g["insertion_auc"].mean()})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["energy_flag"] = False
    table["energy_limit"] = np.nan
    for method, g in table.groupby("method", sort=False):
        values = g["inside_energy"].where(g["with_object"] >= rules.min_images).to_numpy()
        flagged, limits = far_from_others(values, rules.k, rules.min_gap, "below")
        table.loc[g.index, "energy_flag"] = flagged
        table.loc[g.index, "energy_limit"] = limits
    return table


def strategies(thumbs: np.ndarray, rules: Rules, seed: int) -> dict[str, Any] | None:
    """SpRAy on one class's maps (N,16,16): cluster sizes, the flagged clusters and their members'
    positions in ``thumbs``; None when off or too few maps."""
    if rules.spray is None or len(thumbs) < 2 * int(rules.spray.get("min_size", 3)):
        return None
    found = find_strategies(thumbs, seed=seed, **dict(rules.spray))
    return {"sizes": [int(s) for s in found.sizes], "second": [int(c) for c in found.second],
            "away": [float(s) for s in found.away], "labels": found.labels,
            "mean_maps": found.mean_maps}


def reasons(row: Mapping[str, Any], strategy: Mapping[str, Any] | None, rules: Rules) -> list[str]:
    """Why a (class, method) row is flagged, in words; empty when it is not."""
    out = []
    if row.get("energy_flag"):
        out.append(f"in-object energy {row['inside_energy']:.2f} is below {row['energy_limit']:.2f} (the other "
                   f"classes' median minus their spread); {row['outside_fraction']:.0%} of its images look "
                   "mostly outside the object")
    if strategy and strategy["second"]:
        for c in strategy["second"]:
            out.append(f"a second strategy: {strategy['sizes'][c]} of {sum(strategy['sizes'])} images form a "
                       f"cluster with {strategy['away'][c]:.0%} of its attribution where the class's other maps "
                       "do not go")
    return out


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of ``a`` with the same row of ``b`` ((N,D) each); NaN for a
    constant row."""
    ra = np.argsort(np.argsort(a, axis=1, kind="stable"), axis=1).astype(np.float64)
    rb = np.argsort(np.argsort(b, axis=1, kind="stable"), axis=1).astype(np.float64)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))
    const = (np.ptp(a, axis=1) == 0) | (np.ptp(b, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(const | (den == 0), np.nan, (ra * rb).sum(1) / np.where(den == 0, 1, den))


def drift(now: pd.DataFrame, then: pd.DataFrame, class_names: Sequence[str]) -> pd.DataFrame:
    """Per (class, method): the mean Spearman correlation between this run's and the baseline's map
    of each image present in both (same image id and method). Inputs: ``image_id``, ``method``,
    ``class`` and ``thumb`` ((256,) float arrays)."""
    both = now.merge(then[["image_id", "method", "thumb"]], on=["image_id", "method"], suffixes=("", "_then"))
    if both.empty:
        return pd.DataFrame(columns=["class", "class_name", "method", "images", "map_correlation"])
    rho = spearman_rows(np.stack(both["thumb"].to_numpy()), np.stack(both["thumb_then"].to_numpy()))
    both = both.assign(rho=rho)
    out = both.groupby(["method", "class"], sort=True).agg(images=("rho", "size"), map_correlation=("rho", "mean"))
    out = out.reset_index()
    out["class_name"] = [class_names[int(c)] for c in out["class"]]
    return out[["class", "class_name", "method", "images", "map_correlation"]]
