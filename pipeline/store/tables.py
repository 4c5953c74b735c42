"""Arrow tables of the store: layer parts (one column per channel per statistic) and the images table.

Parts keep one column per channel so that reading one neuron reads one column; a
FixedSizeList column cannot be read one neuron at a time, and pyarrow and Polars refuse a dataset
whose parts have different list sizes. Parquet footers of such wide files take milliseconds to
parse, so readers keep ``ParquetFile`` handles open (:class:`PartFiles`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

IMAGES_SCHEMA = pa.schema([
    ("row_id", pa.int64()),
    ("image_id", pa.string()),
    ("path", pa.string()),
    ("label", pa.int64()),
    ("split", pa.string()),
    ("prediction", pa.int64()),
    ("top5_ids", pa.list_(pa.int32())),
    ("top5_scores", pa.list_(pa.float32())),
    ("true_score", pa.float32()),
])


def column_names(stat: str, channels: int) -> list[str]:
    """``<stat>_0 .. <stat>_{C-1}``."""
    return [f"{stat}_{j}" for j in range(channels)]


def part_table(rows: np.ndarray, maxv: np.ndarray, meanv: np.ndarray, argmax: np.ndarray,
               dtype: np.dtype) -> pa.Table:
    """Build a part: ``row_id``, then ``max_*``, ``mean_*`` (``dtype``) and ``argmax_*`` (int32)."""
    channels = maxv.shape[1]
    arrays: list[pa.Array] = [pa.array(np.asarray(rows, np.int64))]
    names = ["row_id"]
    for stat, block, dt in (("max", maxv, dtype), ("mean", meanv, dtype), ("argmax", argmax, np.int32)):
        cols = np.ascontiguousarray(block.T, dtype=dt)          # (C, N): each channel contiguous
        arrays.extend(pa.array(cols[j]) for j in range(channels))
        names.extend(column_names(stat, channels))
    return pa.Table.from_arrays(arrays, names=names)


def _list_array(block: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """A list<...> array with one list per row of a 2-D block."""
    n, width = block.shape
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32) if n else np.zeros(1, np.int32))
    values = pa.array(np.ascontiguousarray(block).reshape(-1), type=value_type)
    return pa.ListArray.from_arrays(offsets, values)


def images_table(rows: pd.DataFrame, prediction: np.ndarray, top5_ids: np.ndarray,
                 top5_scores: np.ndarray, true_score: np.ndarray) -> pa.Table:
    """The images table for ``rows`` (row_id, image_id, path, label, split) and their predictions."""
    true_score = np.asarray(true_score, np.float32)
    return pa.Table.from_arrays([
        pa.array(rows["row_id"].to_numpy(np.int64)),
        pa.array(rows["image_id"].astype(str).tolist(), pa.string()),
        pa.array(rows["path"].astype(str).tolist(), pa.string()),
        pa.array(rows["label"].astype("Int64"), pa.int64(), from_pandas=True),
        pa.array(rows["split"].astype(object).where(rows["split"].notna(), None).tolist(), pa.string()),
        pa.array(np.asarray(prediction, np.int64)),
        _list_array(np.asarray(top5_ids, np.int32), pa.int32()),
        _list_array(np.asarray(top5_scores, np.float32), pa.float32()),
        pa.array(true_score, pa.float32(), mask=np.isnan(true_score)),
    ], schema=IMAGES_SCHEMA)


class PartFiles:
    """Open ``ParquetFile`` handles of a layer's parts, with each row group's row_id range."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self._files: list[pq.ParquetFile | None] = [None] * len(self.paths)
        self._ranges: list[np.ndarray | None] = [None] * len(self.paths)

    def file(self, i: int) -> pq.ParquetFile:
        f = self._files[i]
        if f is None:
            f = self._files[i] = pq.ParquetFile(self.paths[i])
        return f

    def read(self, columns: Sequence[str]) -> pa.Table:
        """The given columns of all parts, concatenated in part order."""
        return pa.concat_tables([self.file(i).read(columns=list(columns)) for i in range(len(self.paths))])

    def iter_read(self, columns: Sequence[str]) -> Iterator[pa.Table]:
        """Yield each part's columns as a table, one part at a time (bounded memory)."""
        for i in range(len(self.paths)):
            yield self.file(i).read(columns=list(columns))

    def row_group_ranges(self, i: int) -> np.ndarray:
        """(n_row_groups, 2) min/max row_id of part ``i``'s row groups, from the footer statistics."""
        r = self._ranges[i]
        if r is None:
            md = self.file(i).metadata
            col = md.schema.names.index("row_id")
            r = np.array([[md.row_group(g).column(col).statistics.min, md.row_group(g).column(col).statistics.max]
                          for g in range(md.num_row_groups)], np.int64).reshape(-1, 2)
            self._ranges[i] = r
        return r

    def read_row(self, row_id: int, columns: Sequence[str]) -> pa.Table | None:
        """The given columns of one row, reading only the row group that holds it."""
        for i in range(len(self.paths)):
            ranges = self.row_group_ranges(i)
            for g in np.flatnonzero((ranges[:, 0] <= row_id) & (ranges[:, 1] >= row_id)):
                t = self.file(i).read_row_group(int(g), columns=["row_id", *columns])
                hit = np.flatnonzero(t.column("row_id").to_numpy() == row_id)
                if len(hit):
                    return t.slice(int(hit[0]), 1)
        return None
