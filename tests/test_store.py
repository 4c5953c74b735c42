"""Activation store: round trip, top-K, incremental runs, crash safety, shards, foreign readers, errors.

Run as a script (``python tests/test_store.py extract ...``) it is the writer that the crash and
shard tests start as a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import PipelineError
from pipeline.store import ActivationStore, layer_dirname
from pipeline.store import topk as tk
from pipeline.store.layout import CRASH_ENV, tmp_path as tmp_path_of

MODEL = "model-key-a"
LAYERS = {"features.conv1": (6, 4, 5), "fc": (3, 1, 1)}   # name: (C, H, W)
K = 8
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- fake data ---

def image_id(i: int | str) -> str:
    return hashlib.sha256(f"image-{i}".encode()).hexdigest()


def make_records(ids, label=lambda i: i % 3, version: dict | None = None) -> pd.DataFrame:
    """Records for images ``ids``; ``version`` maps an index to a content version (changed bytes)."""
    version = version or {}
    return pd.DataFrame({"image_id": [image_id(f"{i}-v{version.get(i, 0)}") for i in ids],
                         "path": [f"imgs/{i}.png" for i in ids],
                         "label": pd.array([label(i) for i in ids], dtype="Int64"),
                         "split": ["train" if i % 4 else "test" for i in ids]})


def fake_spatial(image_ids, name: str, c: int, h: int, w: int) -> np.ndarray:
    """Deterministic (N, C, H*W) activations per image id; channel 0 has ties, channel 1 is dead."""
    out = np.empty((len(image_ids), c, h * w), np.float32)
    for n, iid in enumerate(image_ids):
        rng = np.random.default_rng(int(hashlib.sha256((name + iid).encode()).hexdigest()[:15], 16))
        a = rng.random((c, h * w)).astype(np.float32)
        a[0] = np.round(a[0] * 4) / 4
        a[1] = 0.0
        out[n] = a
    return out


def fake_layers(image_ids, layers=LAYERS) -> dict:
    out = {}
    for name, (c, h, w) in layers.items():
        a = fake_spatial(list(image_ids), name, c, h, w)
        out[name] = {"max": a.max(2), "mean": a.mean(2), "argmax": a.argmax(2).astype(np.int32), "hw": (h, w)}
    return out


def fake_predictions(chunk: pd.DataFrame) -> dict:
    seed = np.array([int(s[:8], 16) for s in chunk["image_id"]], np.int64)
    ids = np.stack([(seed + j) % 10 for j in range(5)], 1).astype(np.int32)
    scores = np.sort((seed[:, None] % 97 + np.arange(5)[None]) / 500.0, 1)[:, ::-1].astype(np.float32)
    label = chunk["label"].to_numpy(dtype=float, na_value=np.nan)
    return {"prediction": ids[:, 0], "top5_ids": ids, "top5_scores": scores,
            "true_score": np.where(np.isnan(label), np.nan, seed % 13 + label).astype(np.float32)}


def extract(root, records, layers=LAYERS, shard=0, num_shards=1, part_size=16, slow=0.0,
            store_kwargs=None) -> int:
    """What the extract stage does: plan, then write the planned chunks. Returns the planned count."""
    store = ActivationStore.open(root, MODEL, create=True, top_k=K, **(store_kwargs or {}))
    plan = store.plan(records, list(layers), shard=shard, num_shards=num_shards)
    for chunk in plan.chunks(part_size):
        plan.write(chunk, fake_layers(chunk["image_id"], layers), fake_predictions(chunk))
        time.sleep(slow)
    return len(plan)


def build(root, records, layers=LAYERS, **kw) -> ActivationStore:
    extract(root, records, layers, **kw)
    store = ActivationStore.open(root, MODEL)
    store.finalize(records)
    return store


def snapshot(root) -> dict:
    """Everything that must be identical between two runs: rows, values, top-K, manifests' layer info."""
    store = ActivationStore.open(root, MODEL)
    images = store.images().sort_values("row_id").reset_index(drop=True)
    for col in ("top5_ids", "top5_scores"):
        images[col] = images[col].map(tuple)
    out = {"images": images, "layers": {}, "next_row_id": store.manifest["next_row_id"]}
    for layer in store.layers():
        parts = pd.read_parquet(Path(root) / layer_dirname(layer)).sort_values("row_id").reset_index(drop=True)
        with np.load(Path(root) / ".meta" / layer_dirname(layer) / "topk.npz") as z:
            top = {k: z[k] for k in z.files}
        info = {k: v for k, v in store.manifest["layers"][layer].items() if k != "state"}
        out["layers"][layer] = (parts, top, info)
    return out


def assert_same(a: dict, b: dict) -> None:
    pd.testing.assert_frame_equal(a["images"], b["images"])
    assert a["next_row_id"] == b["next_row_id"]
    assert a["layers"].keys() == b["layers"].keys()
    for layer in a["layers"]:
        pa_, ta, ia = a["layers"][layer]
        pb, tb, ib = b["layers"][layer]
        pd.testing.assert_frame_equal(pa_, pb)
        assert ta.keys() == tb.keys()
        for k in ta:
            np.testing.assert_array_equal(ta[k], tb[k], err_msg=f"{layer} {k}")
        assert ia == ib


def brute_topk(values: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    order = np.lexsort((rows, -values))
    return rows[order][:k]


def layer_frame(root, layer) -> pd.DataFrame:
    return pd.read_parquet(Path(root) / layer_dirname(layer)).sort_values("row_id").reset_index(drop=True)


# --------------------------------------------------------------------------------- tests ---

def test_round_trip(tmp_path):
    recs = make_records(range(40))
    store = build(tmp_path, recs)
    assert store.layers() == sorted(LAYERS)
    assert store.channels("features.conv1") == 6 and store.hw("features.conv1") == (4, 5)
    images = store.images()
    assert len(images) == 40 and list(images["row_id"]) == list(range(40))
    assert list(images["image_id"]) == sorted(recs["image_id"])       # new ids assigned in image-id order
    by_id = recs.set_index("image_id")
    assert (images["path"].to_numpy() == by_id.loc[images["image_id"], "path"].to_numpy()).all()
    assert images["label"].tolist() == by_id.loc[images["image_id"], "label"].tolist()
    expected = fake_layers(images["image_id"])
    for layer, (c, _, _) in LAYERS.items():
        df = layer_frame(tmp_path, layer)
        assert list(df["row_id"]) == list(range(40))
        for stat in ("max", "mean", "argmax"):
            got = df[[f"{stat}_{j}" for j in range(c)]].to_numpy()
            np.testing.assert_array_equal(got, expected[layer][stat])
    preds = fake_predictions(images.assign(label=images["label"]))
    np.testing.assert_array_equal(np.stack(images["top5_ids"].to_numpy()), preds["top5_ids"])
    np.testing.assert_allclose(images["true_score"].to_numpy(dtype=float), preds["true_score"])


def test_topk_matches_brute_force(tmp_path):
    store = build(tmp_path, make_records(range(50)), part_size=7)
    for layer, (c, h, w) in LAYERS.items():
        df = layer_frame(tmp_path, layer)
        rows = df["row_id"].to_numpy()
        for by in ("max", "mean"):
            for ch in range(c):
                for k in (3, K, K + 5):                 # K + 5 scans the column
                    got = store.topk(layer, ch, k=k, by=by)
                    want = brute_topk(df[f"{by}_{ch}"].to_numpy(), rows, k)
                    assert got["row_id"].tolist() == want.tolist(), (layer, by, ch, k)
                    np.testing.assert_array_equal(got["value"], df.set_index("row_id").loc[want, f"{by}_{ch}"])
                    am = df.set_index("row_id").loc[want, f"argmax_{ch}"].to_numpy()
                    assert (got["y"].to_numpy() == am // w).all() and (got["x"].to_numpy() == am % w).all()
    top = store.topk("features.conv1", 2, k=3)
    assert list(top.columns) == ["row_id", "image_id", "path", "label", "value", "y", "x"]
    assert top["path"].str.startswith("imgs/").all()


def test_chunk_topk_and_merge_are_exact_with_ties():
    rng = np.random.default_rng(0)
    values = np.round(rng.random((200, 5)) * 3).astype(np.float32)   # very many ties
    values[:, 4] = 0
    rows = rng.permutation(1000)[:200].astype(np.int64)
    argmax = rng.integers(0, 9, (200, 5)).astype(np.int32)
    whole = tk.chunk_topk(values, rows, argmax, 10)
    pieces = [tk.chunk_topk(values[s:s + 30], rows[s:s + 30], argmax[s:s + 30], 10) for s in range(0, 200, 30)]
    merged = tk.merge(pieces[::-1], 10)
    for c in range(5):
        want = brute_topk(values[:, c], rows, 10)
        assert whole.rows[c].tolist() == want.tolist()
        assert merged.rows[c].tolist() == want.tolist()
    first = tk.chunk_topk(values[:120], rows[:120], argmax[:120], 10)
    rest = tk.chunk_topk(values[120:], rows[120:], argmax[120:], 10, tk.floor_of(first, 10))
    assert tk.merge([first, rest], 10).rows.tolist() == whole.rows.tolist()
    dropped = np.sort(whole.rows[0, :3])
    top, lost = tk.drop_rows(whole, dropped, 10)
    assert lost.tolist() == [np.isin(dropped, whole.rows[c]).any() for c in range(5)]
    assert not np.isin(top.rows, dropped).any() and lost[0]
    small = tk.chunk_topk(values[:6], rows[:6], argmax[:6], 10)       # holds every row: stays exact
    assert not tk.drop_rows(small, np.sort(rows[:2]), 10)[1].any()


def test_incremental_add_change_remove(tmp_path):
    ids = list(range(30))
    build(tmp_path, make_records(ids))
    store = ActivationStore.open(tmp_path, MODEL)
    store.build_index("features.conv1", "flat", "ip")
    old_images = store.images().set_index("image_id")
    # remove 0-4, add 30-34, change the bytes of 10 and 11, relabel 20
    new_ids = list(range(5, 35))
    recs = make_records(new_ids, label=lambda i: 0 if i == 20 else i % 3, version={10: 1, 11: 1})
    store = ActivationStore.open(tmp_path, MODEL)
    plan = store.plan(recs, list(LAYERS))
    changed = {image_id(f"{i}-v1") for i in (10, 11)} | {image_id(f"{i}-v0") for i in range(30, 35)}
    assert set(plan.records["image_id"]) == changed | {image_id("20-v0")}
    assert extract(tmp_path, recs) == len(changed) + 1
    stats = ActivationStore.open(tmp_path, MODEL).finalize(recs)
    assert stats["added"] == 7 and stats["removed"] == 7 and stats["changed"]
    store = ActivationStore.open(tmp_path, MODEL)
    images = store.images()
    assert sorted(images["image_id"]) == sorted(recs["image_id"])
    kept = images[images["image_id"].isin(old_images.index)].set_index("image_id")
    assert (kept["row_id"] == old_images.loc[kept.index, "row_id"]).all()        # stable row ids
    assert images.set_index("path").loc["imgs/20.png", "label"] == 0
    live = set(images["row_id"])
    removed = set(old_images["row_id"]) - live
    assert len(removed) == 7
    expected = fake_layers(images.sort_values("row_id")["image_id"])
    for layer, (c, _, _) in LAYERS.items():
        df = layer_frame(tmp_path, layer)
        assert list(df["row_id"]) == sorted(live)
        np.testing.assert_array_equal(df[[f"mean_{j}" for j in range(c)]].to_numpy(), expected[layer]["mean"])
        for by in ("max", "mean"):
            for ch in range(c):
                got = store.topk(layer, ch, k=K, by=by)["row_id"].tolist()
                assert got == brute_topk(df[f"{by}_{ch}"].to_numpy(), df["row_id"].to_numpy(), K).tolist()
                assert not removed & set(got)
    with pytest.raises(PipelineError, match="out of date"):
        store.direction("features.conv1", np.ones(6))
    assert store.build_index("features.conv1", "flat", "ip")["built"]
    res = store.direction("features.conv1", np.ones(6), k=len(live))
    assert set(res["row_id"]) == live


def test_rerun_without_changes_is_a_noop(tmp_path):
    recs = make_records(range(20))
    store = build(tmp_path, recs)
    assert store.build_index("fc", "flat", "cosine")["built"]
    gen = store.generation
    assert extract(tmp_path, recs) == 0
    store = ActivationStore.open(tmp_path, MODEL)
    assert store.finalize(recs)["changed"] is False and store.generation == gen
    assert store.build_index("fc", "flat", "cosine")["built"] is False
    # a moved file (same bytes) only updates the path: no model work, parts untouched
    moved = recs.assign(path=recs["path"].str.replace("imgs/", "moved/"))
    assert extract(tmp_path, moved) == 0
    state = store.manifest["layers"]["fc"]["state"]
    store.finalize(moved)
    assert store.images()["path"].str.startswith("moved/").all()
    assert store.manifest["layers"]["fc"]["state"] == state
    assert store.build_index("fc", "flat", "cosine")["built"] is False


def test_new_layer_on_existing_store_writes_only_that_layer(tmp_path):
    recs = make_records(range(20))
    build(tmp_path, recs, layers={"fc": LAYERS["fc"]})
    store = ActivationStore.open(tmp_path, MODEL)
    fc_state = store.manifest["layers"]["fc"]["state"]
    assert extract(tmp_path, recs) == 20                   # every image lacks features.conv1
    store.finalize(recs)
    assert store.manifest["layers"]["fc"]["state"] == fc_state
    assert_same(snapshot(tmp_path), snapshot(_fresh(tmp_path.parent / "fresh", recs)))


def _fresh(root, recs, **kw):
    build(root, recs, **kw)
    return root


def _run_writer(root, recs_path, *args, env=None, wait=True):
    cmd = [sys.executable, str(Path(__file__)), "extract", str(root), str(recs_path), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if wait:
        out, err = proc.communicate(timeout=120)
        return proc.returncode, err.decode()
    return proc


BASE, UPDATE = make_records(range(30)), make_records(range(6, 45), version={12: 1})


@pytest.fixture(scope="module")
def update_reference(tmp_path_factory) -> dict:
    """Snapshot of an uninterrupted run: BASE, then the scheduled re-run with UPDATE."""
    root = tmp_path_factory.mktemp("reference")
    build(root, BASE, part_size=5)
    build(root, UPDATE, part_size=5)
    return snapshot(root)


@pytest.mark.parametrize("crash", ["part_written:3", "journal_written:2", "finalize_staged:1",
                                   "finalize_committed:1", "finalize_applying:1"])
def test_kill_and_resume_equals_uninterrupted(tmp_path, crash, update_reference):
    base, update = BASE, UPDATE
    root = tmp_path / "crashed"
    build(root, base, part_size=5)
    update.to_parquet(tmp_path / "update.parquet")
    code, err = _run_writer(root, tmp_path / "update.parquet", 0, 1, 5, "finalize",
                            env={CRASH_ENV: crash})
    assert code == -signal.SIGKILL, err
    build(root, update, part_size=5)                      # the scheduled re-run
    assert_same(snapshot(root), update_reference)
    assert not (root / ".work").exists()
    for layer in LAYERS:
        names = {p.name for p in (root / layer_dirname(layer)).iterdir()}
        listed = {p["file"] for p in json.loads((root / ".meta" / layer_dirname(layer) / "manifest.json")
                                                 .read_text())["parts"]}
        assert names == listed


def test_external_sigkill_mid_extraction(tmp_path):
    recs = make_records(range(60))
    recs.to_parquet(tmp_path / "recs.parquet")
    root = tmp_path / "killed"
    proc = _run_writer(root, tmp_path / "recs.parquet", 0, 1, 4, "slow", wait=False)
    journal = root / ".work" / "g000001" / "s000of001" / "journal.json"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if len(json.loads(journal.read_text())["parts"]) >= 3:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(json.loads(journal.read_text())["parts"])
    assert 3 <= done < 15
    assert extract(root, recs, part_size=4) == 60 - 4 * done
    ActivationStore.open(root, MODEL).finalize(recs)
    assert_same(snapshot(root), snapshot(_fresh(tmp_path / "reference", recs, part_size=4)))


def test_two_concurrent_shards_equal_single_run(tmp_path):
    base, update = make_records(range(25)), make_records(range(5, 50))
    single = tmp_path / "single"
    build(single, base)
    build(single, update)
    sharded = tmp_path / "sharded"
    build(sharded, base)
    update.to_parquet(tmp_path / "recs.parquet")
    procs = [_run_writer(sharded, tmp_path / "recs.parquet", s, 2, 3, wait=False) for s in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    shard_dirs = sorted(p.name for p in (sharded / ".work" / "g000002").iterdir())
    assert shard_dirs == ["s000of002", "s001of002"]
    ActivationStore.open(sharded, MODEL).finalize(update)
    assert_same(snapshot(sharded), snapshot(single))


def test_layer_wide_reads_agree_with_the_parquet_files(tmp_path):
    recs = make_records(range(30))
    build(tmp_path, recs)
    build(tmp_path, make_records(range(4, 36)))                 # removed rows and a second generation
    store = ActivationStore.open(tmp_path, MODEL)
    images = store.images().set_index("row_id")
    for layer, (c, _, _) in LAYERS.items():
        df = layer_frame(tmp_path, layer)
        means = [f"mean_{j}" for j in range(c)]
        got, n = store.channel_means(layer)
        assert n == len(df)
        np.testing.assert_allclose(got, df[means].to_numpy(np.float64).mean(0), rtol=1e-12)
        table = store.top_images(layer, 3)
        assert table["channel"].tolist() == list(range(c))
        for ch in range(c):
            want = store.topk(layer, ch, k=3)
            assert table["top"][ch] == want["image_id"].tolist()
            assert table["value"][ch] == df[f"max_{ch}"].max() == want["value"][0]
        rows, vectors, source = store.mean_vectors(layer)
        assert source == "parquet"
        order = np.argsort(rows)
        np.testing.assert_array_equal(rows[order], df["row_id"].to_numpy())
        np.testing.assert_array_equal(vectors[order], df[means].to_numpy(np.float32))
        store.build_index(layer, "flat", "ip")
        rows2, vectors2, source = store.mean_vectors(layer)
        assert source == "index-flat-ip" and not vectors2.flags.writeable
        at = {r: i for i, r in enumerate(rows2)}
        np.testing.assert_array_equal(vectors2[[at[r] for r in rows]], vectors)
        ids = images.loc[df["row_id"].to_numpy()[::-3], "image_id"].tolist()
        np.testing.assert_array_equal(store.pooled(layer, ids), df[means].to_numpy(np.float32)[::-3])
        assert store.pooled(layer, [*ids, "not-an-image"]) is None


def test_rejected_write_leaves_no_trace(tmp_path):
    recs = make_records(range(24))
    store = ActivationStore.open(tmp_path, MODEL, create=True, top_k=K)
    plan = store.plan(recs, list(LAYERS))
    for i, chunk in enumerate(plan.chunks(8)):
        acts = fake_layers(chunk["image_id"])
        if i == 1:
            bad = {**acts, "fc": {**acts["fc"], "mean": np.full_like(acts["fc"]["mean"], np.nan)}}
            with pytest.raises(PipelineError, match="NaN"):
                plan.write(chunk, bad, fake_predictions(chunk))
            with pytest.raises(PipelineError, match="predictions must be"):
                plan.write(chunk, acts, {**fake_predictions(chunk), "true_score": np.zeros(3)})
        plan.write(chunk, acts, fake_predictions(chunk))
    store.finalize(recs)
    assert_same(snapshot(tmp_path), snapshot(_fresh(tmp_path / "ref", recs, part_size=8)))


def test_finalize_refuses_a_missing_shard_or_layer(tmp_path):
    recs = make_records(range(20))
    extract(tmp_path, recs, shard=0, num_shards=2)
    store = ActivationStore.open(tmp_path, MODEL)
    with pytest.raises(PipelineError, match="have not been extracted.*every shard"):
        store.finalize(recs)
    extract(tmp_path, recs, shard=1, num_shards=2, layers={"fc": LAYERS["fc"]})
    with pytest.raises(PipelineError, match="layer 'features.conv1' lacks"):
        ActivationStore.open(tmp_path, MODEL).finalize(recs)
    extract(tmp_path, recs, shard=1, num_shards=2)
    ActivationStore.open(tmp_path, MODEL).finalize(recs)
    assert_same(snapshot(tmp_path), snapshot(_fresh(tmp_path / "ref", recs)))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_readable_by_duckdb_pandas_polars(tmp_path, dtype):
    duckdb = pytest.importorskip("duckdb")
    pl = pytest.importorskip("polars")
    recs = make_records(range(30))
    root = tmp_path / "store"
    build(root, recs, part_size=7, store_kwargs={"dtype": dtype})
    build(root, make_records(range(3, 33)), part_size=7)      # compaction leaves only live rows
    layer = root / layer_dirname("features.conv1")
    assert all(p.name.startswith("part-") and p.suffix == ".parquet" for p in layer.iterdir())
    want = layer_frame(root, "features.conv1")
    assert len(want) == 30 and want["row_id"].is_unique
    # DuckDB's and Polars' globs do match hidden files, so a temporary file must not end in .parquet
    hidden = layer / ".hidden.parquet"
    hidden.write_bytes((layer / next(p.name for p in layer.iterdir())).read_bytes())
    assert duckdb.sql(f"select count(*) from read_parquet('{layer}/*.parquet')").fetchall()[0][0] > 30
    hidden.unlink()
    tmp = tmp_path_of(layer / "part-x.parquet")
    tmp.write_bytes(b"half-written")
    sql = f"select row_id, max_3 from read_parquet('{layer}/*.parquet') order by row_id"
    duck = duckdb.sql(sql).df()
    np.testing.assert_array_equal(duck["row_id"], want["row_id"])
    np.testing.assert_array_equal(duck["max_3"].astype(np.float32), want["max_3"].astype(np.float32))
    tmp.unlink()                                       # (a bare folder read needs one file suffix in Polars)
    for frame in (pl.read_parquet(layer), pl.read_parquet(f"{layer}/*.parquet")):
        frame = frame.sort("row_id")
        np.testing.assert_array_equal(frame["mean_5"].to_numpy(), want["mean_5"].to_numpy())
    store = ActivationStore.open(root, MODEL)
    for ch in range(6):
        want_rows = brute_topk(want[f"max_{ch}"].to_numpy(np.float32), want["row_id"].to_numpy(), 5)
        assert store.topk("features.conv1", ch, k=5)["row_id"].tolist() == want_rows.tolist()
    images = root / "images.parquet"
    n_dd = duckdb.sql(f"select count(*), count(distinct image_id) from read_parquet('{images}')").fetchall()[0]
    assert n_dd == (30, 30)
    assert pl.read_parquet(images)["top5_ids"].list.len().to_list() == [5] * 30
    assert set(pd.read_parquet(images)["path"]) == {f"imgs/{i}.png" for i in range(3, 33)}


def _clustered(n, c, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.random((12, c)) * 3
    return np.maximum(centers[rng.integers(0, 12, n)] + 0.3 * rng.standard_normal((n, c)), 0).astype(np.float32)


def _vector_store(root, vectors: np.ndarray, dup: int = 0) -> ActivationStore:
    """A store of one 1x1 layer whose mean vectors are ``vectors`` (written through the normal API)."""
    n, c = vectors.shape
    recs = make_records(range(n))
    store = ActivationStore.open(root, MODEL, create=True, top_k=K)
    plan = store.plan(recs, ["pool"])
    order = {iid: i for i, iid in enumerate(recs["image_id"])}
    for chunk in plan.chunks(256):
        v = vectors[[order[i] for i in chunk["image_id"]]]
        plan.write(chunk, {"pool": {"max": v, "mean": v, "argmax": np.zeros_like(v, np.int32),
                                             "hw": (1, 1)}}, fake_predictions(chunk))
    store.finalize(recs)
    return store


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_exact_search_equals_brute_force(tmp_path, metric):
    x = _clustered(700, 12)
    x[100:160] = x[50]                                     # exact duplicates: ties at the cut
    store = _vector_store(tmp_path, x)
    info = store.build_index("pool", "flat", metric, prescan_min_rows=0, prescan_shards=2)
    assert info["prescan"] == 2
    frame = layer_frame(tmp_path, "pool")
    rows = frame["row_id"].to_numpy()
    data = np.ascontiguousarray(frame[[f"mean_{j}" for j in range(12)]].to_numpy(np.float32))
    if metric == "cosine":                                  # the index keeps float32 unit vectors
        data = data / np.linalg.norm(data, axis=1, keepdims=True)
    data = data.astype(np.float64)
    rng = np.random.default_rng(3)
    queries = [rng.standard_normal(12), data[50], data[7] - data[300], np.abs(rng.standard_normal(12))]
    for q in queries:
        qq = q / np.linalg.norm(q) if metric == "cosine" else q
        scores = data @ qq
        for k in (1, 10, 70):
            want = rows[np.lexsort((rows, -scores))][:k]
            got = store.direction("pool", q, k=k, metric=metric)
            assert got["row_id"].tolist() == want.tolist()
            np.testing.assert_allclose(got["score"], np.sort(scores)[::-1][:k], rtol=1e-9, atol=1e-9)
    image = store.images()["path"].iloc[200]
    nb = store.neighbours("pool", image, k=5, metric=metric)
    assert image not in set(nb["path"]) and len(nb) == 5


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_search_recall(tmp_path, kind):
    x = _clustered(3000, 16, seed=1)
    store = _vector_store(tmp_path, x)
    info = store.build_index("pool", kind, "cosine")
    assert info["calibration_recall_at_10"] >= 0.98
    images = store.images()["path"].to_numpy()
    recalls = []
    for i in range(0, 3000, 150):
        exact = set(store.neighbours("pool", images[i], k=10, metric="cosine")["row_id"])
        approx = set(store.neighbours("pool", images[i], k=10, metric="cosine", exact=False)["row_id"])
        recalls.append(len(exact & approx) / 10)
    assert np.mean(recalls) >= 0.9
    assert store.build_index("pool", kind, "cosine")["built"] is False


def test_class_direction_and_top_neurons(tmp_path):
    store = build(tmp_path, make_records(range(30), label=lambda i: i % 3 if i % 5 else None))
    images = store.images()
    df = layer_frame(tmp_path, "features.conv1").set_index("row_id")
    means = df[[f"mean_{j}" for j in range(6)]].astype(np.float64)
    lab = images.set_index("row_id")["label"]
    want = means[lab == 0].mean().to_numpy() - means[lab == 2].mean().to_numpy()
    np.testing.assert_allclose(store.class_direction("features.conv1", 0, 2), want, rtol=1e-12)
    np.testing.assert_allclose(ActivationStore.open(tmp_path, MODEL).class_direction("features.conv1", 0, 2), want)
    row = int(images["row_id"].iloc[4])
    top = store.top_neurons("features.conv1", images["path"].iloc[4], k=3, by="mean")
    vals = means.loc[row].to_numpy()
    assert top["channel"].tolist() == brute_topk(vals, np.arange(6), 3).tolist()
    assert store.top_neurons("fc", images["image_id"].iloc[4], k=2)[["y", "x"]].to_numpy().max() == 0


def test_layer_names_are_safe_folder_names(tmp_path):
    layers = {"block/conv.1": (3, 2, 2), ".hidden": (3, 1, 1)}
    store = build(tmp_path, make_records(range(10)), layers=layers)
    assert store.layers() == sorted(layers)
    assert (tmp_path / "block%2Fconv.1").is_dir() and (tmp_path / "%2Ehidden").is_dir()
    assert len(store.topk("block/conv.1", 2, k=3)) == 3


def test_errors_name_the_problem_and_the_fix(tmp_path):
    with pytest.raises(PipelineError, match="no activation store.*stage=extract"):
        ActivationStore.open(tmp_path / "nothing", MODEL)
    recs = make_records(range(12))
    store = build(tmp_path, recs)
    with pytest.raises(PipelineError, match="built with another model"):
        ActivationStore.open(tmp_path, "model-key-b")
    with pytest.raises(PipelineError, match=r"unknown layer .fc2.; the store has: fc, features.conv1. "
                                            r"Did you mean: fc"):
        store.topk("fc2", 0)
    with pytest.raises(PipelineError, match=r"channel 6 is out of range.*6 channels: use 0..5"):
        store.topk("features.conv1", 6)
    with pytest.raises(PipelineError, match="channel -1 is out of range"):
        store.channels("fc") and store.topk("fc", -1)
    with pytest.raises(PipelineError, match="by must be"):
        store.topk("fc", 0, by="median")
    with pytest.raises(PipelineError, match="k must be a positive"):
        store.topk("fc", 0, k=0)
    with pytest.raises(PipelineError, match="unknown image 'imgs/99.png'.*Did you mean"):
        store.top_neurons("fc", "imgs/99.png")
    with pytest.raises(PipelineError, match="no exact.*stage=index"):
        store.direction("fc", np.ones(3))
    with pytest.raises(PipelineError, match="unknown index kind"):
        store.build_index("fc", "annoy")
    with pytest.raises(PipelineError, match="unknown metric"):
        store.build_index("fc", "flat", "l1")
    store.build_index("fc", "flat", "ip")
    with pytest.raises(PipelineError, match="has 4 values but the layer has 3"):
        store.direction("fc", np.ones(4))
    with pytest.raises(PipelineError, match="no ivf"):
        store.direction("fc", np.ones(3), metric="ip", exact=False)
    with pytest.raises(PipelineError, match="class 7 has no images"):
        store.class_direction("fc", 0, 7)
    with pytest.raises(PipelineError, match="lack the column"):
        store.plan(pd.DataFrame({"path": ["a"]}), ["fc"])
    fresh = ActivationStore.open(tmp_path, MODEL)
    more = make_records(range(14))
    ended = fresh.plan(more, ["fc"])
    fresh.finalize(recs)
    with pytest.raises(PipelineError, match="finalized since.*call store.plan"):
        ended.write(ended.records, {}, {})
    other = fresh.plan(more, ["fc"])
    extract(tmp_path, more)
    ActivationStore.open(tmp_path, MODEL).finalize(more)
    with pytest.raises(PipelineError, match="another store object or process finalized.*call store.plan"):
        other.write(other.records, {}, {})
    fresh = ActivationStore.open(tmp_path, MODEL)
    more = make_records(range(16))
    replaced = fresh.plan(more, ["fc"])
    plan = fresh.plan(more, ["fc"])
    with pytest.raises(PipelineError, match="newer plan.*call store.plan"):
        replaced.write(replaced.records, {}, {})
    chunk = plan.records
    bad = fake_layers(chunk["image_id"], {"fc": (5, 1, 1)})
    with pytest.raises(PipelineError, match="has 3 channels.*but 5.*model changed"):
        plan.write(chunk, bad, fake_predictions(chunk))
    empty = ActivationStore.open(tmp_path / "empty", MODEL, create=True)
    with pytest.raises(PipelineError, match="no layers yet.*stage=extract"):
        empty.topk("fc", 0)


# ------------------------------------------------------------------ subprocess entry point ---

def _main(argv: list[str]) -> None:
    """``extract <root> <records.parquet> <shard> <num_shards> <part_size> [finalize] [slow]``."""
    _, root, recs_path, shard, num_shards, part_size, *flags = argv
    recs = pd.read_parquet(recs_path)
    extract(root, recs, shard=int(shard), num_shards=int(num_shards), part_size=int(part_size),
            slow=0.05 if "slow" in flags else 0.0)
    if "finalize" in flags:
        ActivationStore.open(root, MODEL).finalize(recs)


if __name__ == "__main__":
    _main(sys.argv[1:])
