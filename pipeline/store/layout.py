"""Names and small file helpers shared by the store's modules.

Store folder (one per model)::

    <root>/manifest.json                 store manifest, written last (the commit point's final step)
    <root>/images.parquet                one row per live image
    <root>/<layer>/part-*.parquet        the layer's Parquet dataset root: complete parts only
    <root>/.meta/<layer>/                layer manifest, top-K arrays, class means, FAISS indexes
    <root>/.work/                        shard journals and parts of an unfinished extraction, and the
                                         roll-forward log of an unfinished finalize

The layer folder holds nothing but part files because pandas/pyarrow try to read every file in a
dataset folder and Polars refuses a folder whose files have different suffixes; the hidden
``.meta`` and ``.work`` folders keep everything else out of the way. Temporary files are named
``.<name>.tmp``: DuckDB's and Polars' ``*.parquet`` globs do match hidden files, so a temporary
name must not end in ``.parquet``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT = "activation-store"
VERSION = 1
STORE_MANIFEST = "manifest.json"
IMAGES = "images.parquet"
META = ".meta"
WORK = ".work"
STATS = ("max", "mean", "argmax")
VALUE_STATS = ("max", "mean")
CRASH_ENV = "PIPELINE_STORE_CRASH_AT"
PAUSE_ENV = "PIPELINE_STORE_PAUSE_AT"
DTYPES = {"float32": np.float32, "float16": np.float16}
EXTRACT_HINT = "run `python -m pipeline stage=extract`"
INDEX_HINT = "run `python -m pipeline stage=index`"

_crash_counts: dict[tuple[str, str], int] = {}


def layer_dirname(layer: str) -> str:
    """Folder name for a layer: the dotted name itself, with '/' and other unsafe characters quoted."""
    name = urllib.parse.quote(layer, safe="._-+=@,")
    if name.startswith("."):
        name = "%2E" + name[1:]
    return name


def part_name(generation: int, shard: int, num_shards: int, seq: int) -> str:
    """File name of a part written by a shard; unique across generations and shards."""
    return f"part-g{generation:06d}-s{shard:03d}of{num_shards:03d}-{seq:05d}.parquet"


def compacted_name(generation: int, index: int) -> str:
    """File name of a part rewritten without removed rows at a finalize."""
    return f"part-g{generation:06d}-compact-{index:05d}.parquet"


def tmp_path(path: Path) -> Path:
    """Hidden temporary name beside ``path`` that no ``*.parquet`` glob matches."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_parquet_atomic(table: pa.Table, path: Path, compression: str = "snappy",
                         row_group_size: int = 16384) -> None:
    """Write ``table`` to a hidden temporary file and ``os.replace`` it into place.

    Statistics are kept for ``row_id`` only: a part has thousands of columns and per-column
    statistics make its footer several times larger, which every reader must parse.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    stats = ["row_id"] if "row_id" in table.column_names else True
    try:
        pq.write_table(table, tmp, compression=compression, use_dictionary=False,
                       row_group_size=row_group_size, write_statistics=stats)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def meta_dir(root: Path, layer: str) -> Path:
    """The hidden folder of a layer's manifest, top-K arrays, class sums and indexes."""
    return root / META / layer_dirname(layer)


def crash_point(name: str) -> None:
    """Test hook: the n-th time ``name`` is reached, SIGKILL this process when
    ``$PIPELINE_STORE_CRASH_AT=name:n``, or hold it there (sleep) when ``$PIPELINE_STORE_PAUSE_AT=name:n``,
    for a scheduler or a test to kill it at an exact step. A no-op otherwise."""
    for env in (CRASH_ENV, PAUSE_ENV):
        spec = os.environ.get(env)
        if not spec:
            continue
        point, _, count = spec.rpartition(":")
        if point != name:
            continue
        _crash_counts[(env, name)] = _crash_counts.get((env, name), 0) + 1
        if _crash_counts[(env, name)] >= int(count):
            if env == CRASH_ENV:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)
