"""The audit's comparisons: small pure functions over DataFrames and arrays, no files, no config.

An *images table* has one row per dataset file: ``path``, ``image_id``, ``label`` (Int64, the
model's class index, NA when unlabelled), ``split``, ``prediction`` (Int64, NA when the store lacks
the image) and ``confidence`` (top-1 softmax probability, NaN when unknown). A *neurons table* has
one row per (``layer``, ``channel``): ``max`` (the channel's spatial max over every stored image)
and ``top`` (the image ids of its top-k images, best first).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import faiss
import numpy as np
import pandas as pd

IMAGE_COLUMNS = ("path", "image_id", "label", "split", "prediction", "confidence")


def _same(a: pd.Series, b: pd.Series) -> np.ndarray:
    """Element-wise equality where two missing values count as equal."""
    a_na, b_na = a.isna().to_numpy(), b.isna().to_numpy()
    av = a.astype(object).where(~a_na, None).to_numpy()
    bv = b.astype(object).where(~b_na, None).to_numpy()
    return np.where(a_na | b_na, a_na & b_na, av == bv)


def _short(df: pd.DataFrame, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` rows as JSON-ready dicts (NA -> None)."""
    head = df.head(limit).astype(object)
    return head.where(head.notna(), None).to_dict("records")


# ------------------------------------------------------------------------------------ images ---

def image_changes(cur: pd.DataFrame, base: pd.DataFrame, limit: int = 50) -> dict[str, Any]:
    """Files added, removed, changed (same path, other bytes), relabelled or moved to another split.

    Both tables are images tables; files are matched by path.
    """
    c = cur.drop_duplicates("path").set_index("path")
    b = base.drop_duplicates("path").set_index("path")
    added = c.index.difference(b.index)
    removed = b.index.difference(c.index)
    common = c.index.intersection(b.index)
    cc, bb = c.loc[common], b.loc[common]
    same_bytes = cc["image_id"].to_numpy() == bb["image_id"].to_numpy()
    changed = common[~same_bytes]
    relabelled = common[same_bytes & ~_same(cc["label"], bb["label"])]
    moved = common[same_bytes & ~_same(cc["split"], bb["split"])]

    def rows(paths: pd.Index, extra: dict[str, pd.Series] | None = None) -> list[dict[str, Any]]:
        df = pd.DataFrame({"path": paths})
        for name, col in (extra or {}).items():
            df[name] = col.loc[paths].to_numpy()
        return _short(df, limit)

    return {
        "added": len(added), "removed": len(removed), "changed": len(changed),
        "relabelled": len(relabelled), "moved_split": len(moved),
        "added_list": rows(added, {"split": c["split"], "label": c["label"]}),
        "removed_list": rows(removed, {"split": b["split"], "label": b["label"]}),
        "changed_list": rows(changed),
        "relabelled_list": rows(relabelled, {"old_label": b["label"], "label": c["label"]}),
        "moved_split_list": rows(moved, {"old_split": b["split"], "split": c["split"]}),
    }


def accuracy(images: pd.DataFrame) -> dict[str, Any]:
    """Accuracy over the labelled images that have a prediction: overall, per split and per class."""
    ok = images["label"].notna().to_numpy() & images["prediction"].notna().to_numpy()
    df = images[ok]
    correct = df["label"].to_numpy(np.int64) == df["prediction"].to_numpy(np.int64)
    per_class = (pd.DataFrame({"class": df["label"].to_numpy(np.int64), "correct": correct})
                 .groupby("class")["correct"].agg(["size", "mean"]).reset_index())
    by_split = pd.Series(correct).groupby(df["split"].astype(str).to_numpy()).mean()
    return {"accuracy": float(correct.mean()) if len(df) else None, "labelled": int(len(df)),
            "by_split": {str(k): float(v) for k, v in by_split.items()},
            "per_class": {int(r["class"]): {"n": int(r["size"]), "accuracy": float(r["mean"])}
                          for _, r in per_class.iterrows()}}


def accuracy_delta(cur: Mapping[str, Any], base: Mapping[str, Any] | None) -> dict[str, Any]:
    """The current accuracy summary with the baseline's values and the differences beside it."""
    out: dict[str, Any] = {"accuracy": cur["accuracy"], "labelled": cur["labelled"], "by_split": cur["by_split"],
                           "baseline": None, "delta": None}
    old_classes: Mapping[Any, Any] = {}
    if base is not None:
        out["baseline"] = base.get("accuracy")
        if cur["accuracy"] is not None and out["baseline"] is not None:
            out["delta"] = cur["accuracy"] - out["baseline"]
        out["baseline_by_split"] = base.get("by_split", {})
        old_classes = {int(k): v for k, v in base.get("per_class", {}).items()}
    rows = []
    for cls in sorted(set(cur["per_class"]) | set(old_classes)):
        now, old = cur["per_class"].get(cls), old_classes.get(cls)
        rows.append({"class": cls, "n": now["n"] if now else 0, "accuracy": now["accuracy"] if now else None,
                     "baseline": old["accuracy"] if old else None,
                     "delta": now["accuracy"] - old["accuracy"] if now and old else None})
    out["per_class"] = rows
    return out


def prediction_flips(cur: pd.DataFrame, base: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Images (by image id) whose prediction differs from the baseline's; and how many were compared."""
    cols = ["image_id", "path", "label", "prediction"]
    c = cur[cur["prediction"].notna()].drop_duplicates("image_id")[cols]
    b = base[base["prediction"].notna()].drop_duplicates("image_id")[["image_id", "prediction"]]
    both = c.merge(b.rename(columns={"prediction": "old_prediction"}), on="image_id")
    flips = both[both["prediction"].to_numpy(np.int64) != both["old_prediction"].to_numpy(np.int64)]
    return flips[["image_id", "path", "label", "old_prediction", "prediction"]].reset_index(drop=True), len(both)


def label_noise(images: pd.DataFrame, min_confidence: float) -> pd.DataFrame:
    """Images whose label disagrees with a prediction of at least ``min_confidence``, most confident first."""
    ok = images["label"].notna().to_numpy() & images["prediction"].notna().to_numpy()
    df = images[ok]
    wrong = df["label"].to_numpy(np.int64) != df["prediction"].to_numpy(np.int64)
    sure = df["confidence"].to_numpy(np.float64) >= min_confidence
    out = df[wrong & sure][["path", "image_id", "split", "label", "prediction", "confidence"]]
    return out.sort_values(["confidence", "path"], ascending=[False, True]).reset_index(drop=True)


# ------------------------------------------------------------------------------ localization ---

LOCALIZATION_METRICS = {"pointing": "pointing_hit", "box_accuracy": "box_hit", "mean_iou": "box_iou"}


def localization_by_class(artifacts: pd.DataFrame) -> pd.DataFrame:
    """Per (method, class) localisation from the explain stage's artifacts table: images scored,
    pointing-game rate, box accuracy and mean IoU; rows without a score or a label are left out."""
    scored = artifacts[artifacts["box_iou"].notna() & artifacts["label"].notna()].copy()
    scored["class"] = scored["label"].astype(np.int64)
    table = scored.groupby(["method", "class"], sort=True).agg(
        images=("box_iou", "size"), **{k: (v, "mean") for k, v in LOCALIZATION_METRICS.items()})
    return table.reset_index()


def localization_delta(cur: pd.DataFrame, base: pd.DataFrame | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-class and per-method localisation with the baseline's values and differences."""
    metrics = list(LOCALIZATION_METRICS)
    per_method = _per_method(cur)
    if base is None or base.empty:
        for m in metrics:
            cur[f"{m}_baseline"] = np.nan
            per_method[f"{m}_baseline"] = np.nan
    else:
        cur = cur.merge(base[["method", "class", *metrics]], on=["method", "class"], how="left",
                        suffixes=("", "_baseline"))
        per_method = per_method.merge(_per_method(base), on="method", how="left", suffixes=("", "_baseline"))
    for frame in (cur, per_method):
        for m in metrics:
            frame[f"{m}_delta"] = frame[m] - frame[f"{m}_baseline"]
    return cur, per_method


def _per_method(per_class: pd.DataFrame) -> pd.DataFrame:
    """Image-weighted means over classes, per method."""
    rows = []
    for method, g in per_class.groupby("method", sort=True):
        w = g["images"].to_numpy(np.float64)
        rows.append({"method": method, "images": int(w.sum()),
                     **{m: float(np.average(g[m].to_numpy(np.float64), weights=w)) for m in LOCALIZATION_METRICS}})
    return pd.DataFrame(rows, columns=["method", "images", *LOCALIZATION_METRICS])


# ----------------------------------------------------------------------------------- neurons ---

def dead_neurons(neurons: pd.DataFrame, eps: float) -> pd.DataFrame:
    """The (layer, channel) rows whose spatial max never exceeds ``eps`` on any image."""
    return neurons[neurons["max"].to_numpy(np.float64) <= eps][["layer", "channel", "max"]].reset_index(drop=True)


def jaccard_distance(a: Any, b: Any) -> float:
    """1 - |A & B| / |A | B| of two collections (0 for two empty ones)."""
    a, b = set(a), set(b)
    union = a | b
    return 1.0 - len(a & b) / len(union) if union else 0.0


def topk_changes(cur: pd.DataFrame, base: pd.DataFrame) -> pd.DataFrame:
    """Jaccard distance of each neuron's top-k image-id set vs the baseline, largest first.

    Only neurons in both tables are compared; both sets are cut to the shorter length so that a
    change of ``k`` does not count as a change.
    """
    both = cur[["layer", "channel", "top"]].merge(base[["layer", "channel", "top"]], on=["layer", "channel"],
                                                  suffixes=("", "_baseline"))
    rows = []
    for layer, channel, now, old in both.itertuples(index=False):
        n = min(len(now), len(old))
        a, b = set(list(now)[:n]), set(list(old)[:n])
        rows.append((layer, int(channel), jaccard_distance(a, b), len(a - b), n))
    out = pd.DataFrame(rows, columns=["layer", "channel", "jaccard_distance", "new_in_top", "k"])
    return out.sort_values(["jaccard_distance", "layer", "channel"], ascending=[False, True, True],
                           kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------ vectors and pairs ---

def unit_label_changes(cur: pd.DataFrame, base: pd.DataFrame, limit: int = 50) -> dict[str, Any]:
    """Dissected units whose label changed (another concept, or a label where there was none) and
    units that lost their concept (labelled before, unlabelled now: the IoU fell under the cut), over
    the layers dissected in both. Tables of ``layer``, ``unit``, ``label`` (None = unlabelled),
    ``concept`` (the best one, labelled or not), ``iou``."""
    both = sorted(set(cur["layer"]) & set(base["layer"]))
    m = cur[cur["layer"].isin(both)].merge(base[base["layer"].isin(both)], on=["layer", "unit"], suffixes=("", "_b"))
    m = m.rename(columns={"label_b": "old_label", "iou_b": "old_iou"})
    was = m["old_label"].map(lambda v: isinstance(v, str)).to_numpy(bool)
    now = m["label"].map(lambda v: isinstance(v, str)).to_numpy(bool)
    differ = (m["label"].astype(object).to_numpy() != m["old_label"].astype(object).to_numpy())
    changed = m[now & (~was | differ)][["layer", "unit", "old_label", "label", "old_iou", "iou"]]
    lost = m[was & ~now][["layer", "unit", "old_label", "old_iou", "iou", "concept"]]
    return {"layers": both, "changed": len(changed), "lost": len(lost),
            "changed_list": _short(changed, limit), "lost_list": _short(lost, limit)}


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm as contiguous float32 (all-zero rows stay zero)."""
    x = np.array(x, dtype=np.float32, copy=True, order="C")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def _knn(unit: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities and positions of each row's ``k`` nearest other rows (FAISS, exact);
    missing neighbours are position -1, similarity -inf."""
    n = len(unit)
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    sims, pos = index.search(unit, min(k + 1, n))
    keep = (pos != np.arange(n)[:, None]) & (pos >= 0)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]         # non-self neighbours first, in order
    sims = np.take_along_axis(np.where(keep, sims, -np.inf), order, 1)
    pos = np.take_along_axis(np.where(keep, pos, -1), order, 1)
    if sims.shape[1] < k:
        pad = k - sims.shape[1]
        sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf)
        pos = np.pad(pos, ((0, 0), (0, pad)), constant_values=-1)
    return sims, pos


def knn_outlier_scores(vectors: np.ndarray, k: int) -> np.ndarray:
    """Each vector's mean cosine distance (1 - similarity) to its ``k`` nearest other vectors.

    Rows are L2-normalised first; an all-zero vector has similarity 0 to everything (distance 1).
    With fewer than two vectors every score is 0.
    """
    n = len(vectors)
    if n < 2:
        return np.zeros(n)
    sims, pos = _knn(normalize_rows(vectors), min(k, n - 1))
    valid = pos >= 0
    dist = np.where(valid, 1.0 - sims, 0.0)
    return dist.sum(1) / np.maximum(valid.sum(1), 1)


def similar_pairs(vectors: np.ndarray, threshold: float, k: int) -> pd.DataFrame:
    """Pairs (i < j) of rows with cosine similarity >= ``threshold`` among each row's ``k`` nearest.

    Columns ``i``, ``j``, ``similarity``; sorted by similarity, most similar first.
    """
    n = len(vectors)
    if n < 2:
        return pd.DataFrame({"i": pd.Series(dtype=np.int64), "j": pd.Series(dtype=np.int64),
                             "similarity": pd.Series(dtype=np.float64)})
    sims, pos = _knn(normalize_rows(vectors), min(k, n - 1))
    src = np.repeat(np.arange(n), sims.shape[1])
    sims, pos = sims.ravel(), pos.ravel()
    hit = (pos >= 0) & (sims >= threshold)
    i, j = np.minimum(src[hit], pos[hit]), np.maximum(src[hit], pos[hit])
    pairs = pd.DataFrame({"i": i, "j": j, "similarity": sims[hit].astype(np.float64)})
    pairs = pairs.sort_values("similarity", ascending=False, kind="stable").drop_duplicates(["i", "j"])
    return pairs.reset_index(drop=True)


def duplicate_pairs(images: pd.DataFrame, ids: np.ndarray, near: pd.DataFrame) -> pd.DataFrame:
    """File pairs that are exact (same image id) or near duplicates (``near``: pairs of positions in
    ``ids`` with a similarity), with whether their splits differ.

    Columns: kind ("exact"/"near"), similarity, path_a, split_a, path_b, split_b, across_splits;
    across-split pairs first, then by similarity.
    """
    files = images.drop_duplicates("path")[["image_id", "path", "split"]].reset_index(drop=True)
    files["order"] = np.arange(len(files))
    side = {s: files.rename(columns={c: f"{c}_{s}" for c in files.columns}) for s in ("a", "b")}
    multi = files[files.duplicated("image_id", keep=False)]
    exact = multi.merge(multi, on="image_id", suffixes=("_a", "_b"))
    exact = exact[exact["order_a"] < exact["order_b"]].assign(kind="exact", similarity=1.0)
    pairs = pd.DataFrame({"image_id_a": np.asarray(ids, dtype=object)[near["i"].to_numpy(np.int64)],
                          "image_id_b": np.asarray(ids, dtype=object)[near["j"].to_numpy(np.int64)],
                          "similarity": near["similarity"].to_numpy(np.float64)})
    close = pairs.merge(side["a"], on="image_id_a").merge(side["b"], on="image_id_b").assign(kind="near")
    cols = ["kind", "similarity", "path_a", "split_a", "path_b", "split_b"]
    out = pd.concat([exact[cols], close[cols]], ignore_index=True) if len(close) else exact[cols]
    out["across_splits"] = out["split_a"].astype(str).to_numpy() != out["split_b"].astype(str).to_numpy()
    return out.sort_values(["across_splits", "similarity", "path_a", "path_b"],
                           ascending=[False, False, True, True], kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------ checks ---

def evaluate(values: Mapping[str, float | None], limits: Mapping[str, float | None]) -> list[dict[str, Any]]:
    """One check per configured limit: ``max_<name>`` in ``limits`` against ``values[<name>]``.

    A limit of None turns its check off; a value of None (nothing to compare, e.g. no baseline)
    passes. A check fails when the value exceeds its limit.
    """
    checks = []
    for key, limit in limits.items():
        name = key.removeprefix("max_")
        value = values.get(name)
        if limit is None:
            continue
        failed = value is not None and float(value) > float(limit)
        checks.append({"check": name, "value": value, "limit": float(limit), "failed": bool(failed)})
    return checks
