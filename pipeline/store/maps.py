"""Explanation maps and their scores for whole splits: Parquet parts per method, shard-safe.

One folder per (method, version, settings, model, scoring) under ``cache/maps/<method>/<key>/``
holds ``part-*.parquet`` files, one row per image: ``row_key`` (image id, target and object: a
changed box, mask or target is a miss), ``image_id``, ``target``, ``prediction`` (the model's
predicted class, so a re-run needs no prediction pass), the scores, ``map`` (float16
bytes, area-downsampled to at most ``size`` px a side), ``thumb`` (16x16 float16, for clustering and
drift) and ``object`` (the object mask at the map's size, packed bits; empty without one).

A part is written to a temporary file and renamed into place, so a part is whole or absent: a
killed run loses at most the rows it had not flushed, and shard jobs writing at once never touch
the same file. Readers take every part and keep the newest row of each ``row_key``. Nothing here
holds all maps: the index reads two columns, maps are read for the rows asked for.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch
from torch.nn import functional as F

from pipeline.cache import make_key

FORMAT_VERSION = 2  # 2: rows record the prediction
THUMB = 16
PART_GLOB = "part-*.parquet"
BLOBS = ("map", "thumb")  # one unique float16 blob a row


def map_store_key(method: str, version: int, params: dict[str, Any], model_key: str, size: int,
                  scoring: dict[str, Any]) -> str:
    """The folder key: what is computed, how it is scored and stored, and by which model."""
    return make_key(kind="maps", format=FORMAT_VERSION, method=method, version=version, params=params,
                    model=model_key, size=size, scoring=scoring)


def row_key(image_id: str, target: int, obj: Any) -> str:
    """One row's key: the image, the explained class and its object (box, mask digest or None)."""
    return make_key(image=image_id, target=int(target), object=obj)


def shrink(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(B,H,W) maps area-downsampled so the longer side is at most ``size`` (unchanged if smaller)."""
    h, w = maps.shape[-2:]
    if max(h, w) <= size:
        return maps
    scale = size / max(h, w)
    return F.adaptive_avg_pool2d(maps[:, None].float(), (max(1, round(h * scale)), max(1, round(w * scale))))[:, 0]


def thumbs(maps: torch.Tensor) -> torch.Tensor:
    """(B,16,16) area-downsampled maps: what clustering and drift compare."""
    return F.adaptive_avg_pool2d(maps[:, None].float(), (THUMB, THUMB))[:, 0]


class MapStore:
    """The parts folder of one method's maps under one set of settings and one model (``kind``
    names another per-image result kept the same way, such as ``causal`` predictions)."""

    def __init__(self, root: Path, method: str, key: str, size: int, kind: str = "maps") -> None:
        self.folder = Path(root) / kind / method / key
        self.method = method
        self.size = size

    def parts(self) -> list[Path]:
        return sorted(self.folder.glob(PART_GLOB)) if self.folder.is_dir() else []

    def _dataset(self) -> ds.Dataset | None:
        parts = self.parts()
        return ds.dataset([str(p) for p in parts], format="parquet") if parts else None

    def index(self) -> pd.DataFrame:
        """``row_key``, ``image_id``, ``target`` and (where the rows record it) ``prediction`` of
        every stored row (newest per row key)."""
        d = self._dataset()
        if d is None:
            return pd.DataFrame({"row_key": pd.Series(dtype=str), "image_id": pd.Series(dtype=str),
                                 "target": pd.Series(dtype="int64"), "prediction": pd.Series(dtype="int64")})
        wanted = ["row_key", "image_id", "target", "prediction", "written"]
        table = d.to_table(columns=[c for c in wanted if c in d.schema.names]).to_pandas()
        return (table.sort_values("written", kind="stable").drop_duplicates("row_key", keep="last")
                .drop(columns="written").reset_index(drop=True))

    def read(self, row_keys: Sequence[str], columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The rows of ``row_keys`` (newest of each), with ``columns`` (all when None)."""
        d = self._dataset()
        want = list(dict.fromkeys(row_keys))
        if d is None or not want:
            return pd.DataFrame({"row_key": pd.Series(dtype=str)})
        cols = None if columns is None else list(dict.fromkeys(["row_key", "written", *columns]))
        table = d.to_table(columns=cols, filter=ds.field("row_key").isin(want)).to_pandas()
        return (table.sort_values("written", kind="stable").drop_duplicates("row_key", keep="last")
                .drop(columns="written").reset_index(drop=True))

    def write(self, rows: pd.DataFrame) -> Path:
        """Publish ``rows`` as one new part (temporary file, then rename). The map blobs are written
        without a dictionary: each is unique, and trying one took most of the write."""
        self.folder.mkdir(parents=True, exist_ok=True)
        rows = rows.assign(written=time.time_ns())
        name = f"part-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        final = self.folder / name
        tmp = self.folder / f".{name}.tmp"
        try:
            pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), tmp,
                           use_dictionary=[c for c in rows.columns if c not in BLOBS])
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return final


def encode_maps(maps: torch.Tensor) -> list[bytes]:
    """float16 bytes of each (h,w) map, for the ``map`` and ``thumb`` columns (torch's rounding
    to float16 is numpy's, about 15x faster)."""
    arr = maps.detach().float().cpu().half().numpy()
    return [a.tobytes() for a in arr]


def decode_maps(blobs: Sequence[bytes], h: Sequence[int], w: Sequence[int]) -> list[np.ndarray]:
    """The float32 maps of ``encode_maps`` bytes with their heights and widths."""
    return [np.frombuffer(b, np.float16).astype(np.float32).reshape(int(hh), int(ww)) for b, hh, ww in zip(blobs, h, w)]


def encode_objects(objects: torch.Tensor | None, hw: tuple[int, int], n: int) -> list[bytes]:
    """Packed bits of each object mask shrunk to the stored map's size ``hw`` (empty bytes without)."""
    if objects is None:
        return [b""] * n
    small = F.adaptive_avg_pool2d(objects[:, None].float(), hw)[:, 0] >= 0.5
    return [np.packbits(m.cpu().numpy().ravel()).tobytes() for m in small]


def decode_object(blob: bytes, h: int, w: int) -> np.ndarray | None:
    """The (h,w) bool object mask of ``encode_objects`` bytes, None for an image without one."""
    if not blob:
        return None
    return np.unpackbits(np.frombuffer(blob, np.uint8), count=h * w).reshape(h, w).astype(bool)
