"""The activation store: per-model Parquet parts, running top-K per neuron, FAISS indexes, queries.

Layout of one store (``<cache>/store/<model_key>/``)::

    manifest.json                model key, generation, next_row_id, top_k, dtype, layers (written last)
    images.parquet               row_id, image_id, path, label, split, prediction, top5_ids,
                                 top5_scores (softmax), true_score (pre-softmax score of the label)
    <layer>/part-*.parquet       the layer's Parquet dataset: row_id, max_0..max_{C-1},
                                 mean_0..mean_{C-1} (float32 or float16), argmax_0.. (int32, y*W+x)
    .meta/<layer>/manifest.json  channels, hw (H, W), parts, state key
    .meta/<layer>/topk.npz       top-K per channel by max and by mean: values, row ids, argmax
    .meta/<layer>/index-<kind>-<metric>/   FAISS IndexIDMap2 keyed by row_id (+ exact pre-scan)
    .work/                       shard journals of an unfinished extraction; finalize's commit log

Layer folders hold only complete parts, so DuckDB (``read_parquet('<layer>/*.parquet')``), pandas
and Polars read them and ``images.parquet`` with no project code. Row ids are stable per image id.
Code outside this package reads a store only through :class:`ActivationStore`.

Writing (the extract stage)::

    store = ActivationStore.open(root, model_key, create=True, top_k=100, dtype="float32")
    plan = store.plan(records, layers, shard=0, num_shards=1)   # records: image_id, path, label, split
    for chunk in plan.chunks(part_size):                        # chunk: row_id, image_id, path, label, split
        plan.write(chunk,
                   {layer: {"max": (N, C), "mean": (N, C), "argmax": (N, C), "hw": (H, W)}},
                   {"prediction": (N,), "top5_ids": (N, 5), "top5_scores": (N, 5), "true_score": (N,)})
    store.finalize(records)          # once, after every shard has finished
    store.build_index(layer, kind="flat" | "ivf" | "hnsw", metric="ip" | "cosine", **params)

* ``open`` raises PipelineError for a missing store (run the extract stage) or one built with
  another model.
* ``plan`` returns the shard's records that need the model (new images, a requested layer missing,
  label changed), sorted by image id, shard = crc32(image_id) mod num_shards, with row ids.
* ``plan.write`` is atomic per part; a run killed at any point and re-run (plan again, write the
  chunks it yields) ends with the same store as an uninterrupted run. A plan writes until the
  store is finalized or the same shard is planned again; after that ``write`` raises.
* ``finalize`` merges shard journals and top-Ks, drops images no longer in ``records`` (or whose
  bytes changed, i.e. whose image id is gone), compacts parts, and commits; a no-op when nothing
  changed. ``build_index`` rebuilds only when the layer's parts changed (or the params did).

Queries::

    store.layers(); store.channels(layer); store.hw(layer); store.images()
    store.topk(layer, channel, k=5, by="max")        # row_id, image_id, path, label, value, y, x
    store.top_images(layer, k, by="max")             # every channel: channel, value, top (image ids)
    store.pooled(layer, image_ids)                   # (N, C) mean vectors of those images, or None
    store.channel_means(layer)                       # ((C,) mean over all images, number of images)
    store.mean_vectors(layer)                        # row ids, (N, C) mean vectors, source
    store.top_neurons(layer, image, k=10, by="max")  # channel, value, y, x
    store.direction(layer, vector, k=10, metric=None, exact=True)   # ..., score
    store.neighbours(layer, image, k=10, metric=None, exact=True)   # ..., score (itself excluded)
    store.class_direction(layer, class_a, class_b)   # (C,) mean of A's mean vectors minus B's

``image`` is an image id or a path. Unknown layers, out-of-range channels, unknown images, missing
or out-of-date indexes raise PipelineError naming the fix.
"""

from pathlib import Path

from pipeline.store.layout import layer_dirname
from pipeline.store.search import KINDS, METRICS
from pipeline.store.records import normalize_records, shard_of
from pipeline.store.store import ActivationStore
from pipeline.store.writer import Plan

__all__ = ["ActivationStore", "Plan", "normalize_records", "layer_dirname", "KINDS", "METRICS", "store_root", "shard_of"]


def store_root(cache_root: str | Path, model_key: str) -> Path:
    """The store folder of a model inside a cache root: ``<cache_root>/store/<model_key>``."""
    return Path(cache_root) / "store" / model_key
