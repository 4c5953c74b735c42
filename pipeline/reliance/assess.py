"""The reliance assessment of a whole split: per-class table, strategies, flags and their figures.

Reads the maps behind a scores table from the map store, applies :class:`~pipeline.reliance.summary.Rules`
and, for every flagged (class, method), writes a figure of its worst images (overlays with the
object outlined) and of where its attribution sits outside the object (a class-mean map). Shared by
stage=explain (``explain.select.all``) and stage=audit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.pictures import Tile, display_image, outline, overlay, panel, safe_name
from pipeline.data.images import load_image
from pipeline.reliance.summary import Rules, class_table, reasons, strategies
from pipeline.store.maps import MapStore, decode_maps, decode_object

WORST = 6


def read_thumbs(store: MapStore, keys: Sequence[str]) -> np.ndarray:
    """(N,16,16) thumbs of ``keys``, in their order."""
    got = store.read(keys, columns=["thumb"]).set_index("row_key").reindex(list(keys))
    return np.stack(decode_maps(got["thumb"].tolist(), [16] * len(got), [16] * len(got))) if len(got) else \
        np.zeros((0, 16, 16), np.float32)


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    df = df.astype(object)
    return df.where(df.notna(), None).to_dict("records")


def assess(scores: pd.DataFrame, stores: Mapping[str, MapStore], class_names: Sequence[str], rules: Rules,
           seed: int, figures: Path | None = None, bundle: Any = None, cmap: str = "jet",
           alpha: float = 0.5) -> dict[str, Any]:
    """The reliance section: ``per_class`` rows (class, method, images, inside_energy, pointing,
    outside_fraction, clusters, flagged, reason), ``flagged_classes``, ``rule`` and figures of the
    flagged rows (written under ``figures`` when given, with ``bundle``'s transform)."""
    table = class_table(scores, class_names, rules)
    section: dict[str, Any] = {"rule": rules.text(), "images": int(scores["image_id"].nunique()),
                               "methods": sorted(scores["method"].unique()), "per_class": [],
                               "flagged_classes": [], "figures": []}
    if table.empty:
        return section
    rows, flagged = [], []
    for _, row in table.iterrows():
        g = scores[(scores["method"] == row["method"]) & (scores["class"] == row["class"])]
        strat = strategies(read_thumbs(stores[row["method"]], g["row_key"].tolist()), rules, seed)
        why = reasons(row, strat, rules)
        out = {**row.drop(["energy_flag", "energy_limit"]).to_dict(),
               "clusters": strat["sizes"] if strat else None, "flagged": bool(why), "reason": "; ".join(why)}
        if why:
            flagged.append(row["class_name"])
            if figures is not None and bundle is not None:
                out["figures"] = flagged_figures(g, stores[row["method"]], row, strat, figures, bundle, cmap, alpha)
                section["figures"].append({"class_name": row["class_name"], "method": row["method"],
                                           **out["figures"]})
        rows.append(out)
    section["per_class"] = _records(pd.DataFrame(rows))
    section["flagged_classes"] = list(dict.fromkeys(flagged))
    return section


def _mean_map(maps: list[np.ndarray], objects: list[np.ndarray | None], outside: bool) -> np.ndarray | None:
    """Mean of the maps' positive parts, each normalised to sum 1 (outside the object only when
    ``outside``); None when the maps differ in size or there are none."""
    if not maps or len({m.shape for m in maps}) != 1:
        return None
    acc = np.zeros_like(maps[0])
    for m, o in zip(maps, objects):
        p = np.clip(m, 0, None)
        if outside and o is not None:
            p = np.where(o, 0, p)
        acc += p / p.sum() if p.sum() > 0 else p
    return acc / len(maps)


def flagged_figures(g: pd.DataFrame, store: MapStore, row: Mapping[str, Any], strat: Mapping[str, Any] | None,
                    folder: Path, bundle: Any, cmap: str, alpha: float) -> dict[str, str]:
    """PNGs of one flagged (class, method): its worst images (lowest in-object energy, or the
    second strategy's members) with their objects outlined, and its class-mean outside map."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = safe_name(f"{row['class_name']}_{row['method']}")
    if strat and strat["second"]:
        members = np.flatnonzero(np.isin(strat["labels"], strat["second"]))
        worst = g.iloc[members[:WORST]]
    else:
        worst = g.sort_values("inside_energy", na_position="last").head(WORST)
    data = store.read(g["row_key"].tolist(), columns=["map", "object", "h", "w"]).set_index("row_key")
    tiles = []
    for _, r in worst.iterrows():
        d = data.loc[r["row_key"]]
        m = decode_maps([d["map"]], [d["h"]], [d["w"]])[0]
        shown = display_image(bundle.transform(load_image(r["path"])), bundle.mean, bundle.std)
        obj = decode_object(d["object"], int(d["h"]), int(d["w"]))
        tile = overlay(shown, m, cmap, alpha)
        if obj is not None:
            tile = outline(tile, obj)
        energy = r["inside_energy"]
        tiles.append(Tile(f"{energy:.2f} inside" if np.isfinite(energy) else "no object", tile))
    out: dict[str, str] = {}
    if tiles:
        worst_path = folder / f"{stem}_worst.png"
        panel(tiles, f"class {row['class_name']}, {row['method']}: the images looking least at the object",
              160).save(worst_path)
        out["worst"] = str(worst_path)
    maps = decode_maps(data["map"].tolist(), data["h"].tolist(), data["w"].tolist())
    objects = [decode_object(b, int(h), int(w)) for b, h, w in zip(data["object"], data["h"], data["w"])]
    mean = _mean_map(maps, objects, outside=True)
    if mean is not None and mean.max() > 0:
        grey = np.full((*mean.shape, 3), 128, np.uint8)
        mean_path = folder / f"{stem}_outside_mean.png"
        panel([Tile("outside the object", overlay(grey, mean, cmap, 1.0))],
              f"class {row['class_name']}, {row['method']}: mean attribution outside the object", 160).save(mean_path)
        out["outside_mean"] = str(mean_path)
    return out


def thumbs_table(scores: pd.DataFrame, stores: Mapping[str, MapStore]) -> pd.DataFrame:
    """``image_id``, ``method``, ``class`` and ``thumb`` (256 float32) of every scored row, for
    drift against a later audit."""
    frames = []
    for method, g in scores.groupby("method", sort=False):
        t = read_thumbs(stores[method], g["row_key"].tolist())
        frames.append(pd.DataFrame({"image_id": g["image_id"].to_numpy(), "method": method,
                                    "class": g["class"].to_numpy(), "thumb": list(t.reshape(len(t), -1))}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["image_id", "method", "class", "thumb"])

