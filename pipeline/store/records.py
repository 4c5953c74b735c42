"""The dataset records a store is written from: their normal form, label codes and shard of each image."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError

NA_LABEL = np.iinfo(np.int64).min


def normalize_records(records: pd.DataFrame) -> pd.DataFrame:
    """image_id, path, label (Int64), split; one row per image id (first path), sorted by image id."""
    if not isinstance(records, pd.DataFrame):
        raise PipelineError("records must be a pandas DataFrame with columns image_id, path, label, split.")
    missing = [c for c in ("image_id", "path") if c not in records.columns]
    if missing:
        raise PipelineError(f"records lack the column(s) {', '.join(missing)}: "
                            "give image_id (sha256 of the file), path, label and split.")
    if records["image_id"].isna().any():
        raise PipelineError("records contain rows without an image_id.")
    n = len(records)
    label = records["label"] if "label" in records.columns else pd.Series([pd.NA] * n, index=records.index)
    split = records["split"] if "split" in records.columns else pd.Series([None] * n, index=records.index)
    try:
        label = label.astype("Int64")
    except (TypeError, ValueError) as e:
        raise PipelineError(f"record labels must be integers (or missing): {e}") from None
    df = pd.DataFrame({"image_id": records["image_id"].astype(str).to_numpy(),
                       "path": records["path"].astype(str).to_numpy(),
                       "label": label.to_numpy(),
                       "split": split.astype(object).where(split.notna(), None).to_numpy()})
    df = df.sort_values(["image_id", "path"], kind="stable").drop_duplicates("image_id", keep="first")
    return df.reset_index(drop=True)


def label_code(labels: Any) -> np.ndarray:
    """Labels as int64 with missing -> NA_LABEL, for null-safe comparisons and merges."""
    return pd.array(labels, dtype="Int64").fillna(NA_LABEL).to_numpy(np.int64)


def shard_of(image_ids: Sequence[str], num_shards: int) -> np.ndarray:
    """Deterministic shard of each image id (crc32 mod num_shards)."""
    return np.fromiter((zlib.crc32(s.encode()) for s in image_ids), np.int64, len(image_ids)) % num_shards
