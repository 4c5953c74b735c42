"""stage=audit: the comparison functions on hand-made tables, snapshots, the HTML section, and the
whole stage on clutter digits with injected faults (duplicates across splits, flipped labels,
added images), including the failure that a cron job or CI sees as a non-zero exit status."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.audit import compare, pixels, snapshot
from pipeline.audit.html import render_section
from pipeline.data.clutter import ClutterParams, generate
from pipeline.errors import AuditFailed, PipelineError
from pipeline.runtime import Context
from pipeline.stages import run_stages
from tests.helpers import compose_config

ROOT = Path(__file__).resolve().parents[1]
EXPLAIN = ["explain.methods=[cam,gradcam]", "explain.select.random=6", "explain.select.misclassified=0",
           "explain.metrics.steps=4"]


def _images(rows: list[tuple]) -> pd.DataFrame:
    """An images table from (path, image_id, label, split, prediction, confidence) tuples."""
    df = pd.DataFrame(rows, columns=list(compare.IMAGE_COLUMNS))
    df["label"] = df["label"].astype("Int64")
    df["prediction"] = df["prediction"].astype("Int64")
    df["confidence"] = df["confidence"].astype(float)
    return df


# ------------------------------------------------------------------------------- pure functions ---

def test_image_changes_flips_accuracy_and_label_noise() -> None:
    base = _images([("a.png", "A", 1, "train", 1, 0.9), ("b.png", "B", 2, "train", 2, 0.8),
                    ("c.png", "C", 3, "test", 3, 0.99), ("d.png", "D", 4, "test", 0, 0.5),
                    ("e.png", "E", None, "test", 5, 0.7)])
    cur = _images([("a.png", "A", 1, "train", 1, 0.9),          # unchanged
                   ("b.png", "B2", 2, "train", 2, 0.8),         # same path, new bytes
                   ("c.png", "C", 7, "test", 3, 0.99),          # relabelled (a flipped label)
                   ("d.png", "D", 4, "train", 4, 0.6),          # moved split, prediction flipped
                   ("e.png", "E", None, "test", 5, 0.7),
                   ("f.png", "F", 1, "test", None, np.nan)])    # added, not extracted
    ch = compare.image_changes(cur, base)
    assert (ch["added"], ch["removed"], ch["changed"], ch["relabelled"], ch["moved_split"]) == (1, 0, 1, 1, 1)
    assert ch["relabelled_list"] == [{"path": "c.png", "old_label": 3, "label": 7}]
    assert ch["changed_list"] == [{"path": "b.png"}]
    assert compare.image_changes(base, cur)["removed_list"] == [{"path": "f.png", "split": "test", "label": 1}]

    flips, compared = compare.prediction_flips(cur, base)
    assert compared == 4 and flips["image_id"].tolist() == ["D"]
    assert flips[["old_prediction", "prediction"]].iloc[0].tolist() == [0, 4]

    acc = compare.accuracy(cur)        # labelled with prediction: a, b2, c (wrong), d
    assert acc["labelled"] == 4 and acc["accuracy"] == pytest.approx(0.75)
    assert acc["by_split"] == {"train": 1.0, "test": 0.0}
    assert acc["per_class"][7] == {"n": 1, "accuracy": 0.0}
    delta = compare.accuracy_delta(acc, compare.accuracy(base))
    assert delta["delta"] == pytest.approx(0.75 - 0.75)
    assert {r["class"]: r["delta"] for r in delta["per_class"]}[4] == pytest.approx(1.0)

    noisy = compare.label_noise(cur, min_confidence=0.95)
    assert noisy["path"].tolist() == ["c.png"]
    assert compare.label_noise(cur, min_confidence=0.995).empty


def test_neuron_changes_and_dead_neurons() -> None:
    assert compare.jaccard_distance({1, 2, 3}, {2, 3, 4}) == pytest.approx(0.5)
    assert compare.jaccard_distance([], []) == 0.0
    cur = pd.DataFrame({"layer": ["l1", "l1", "l2"], "channel": [0, 1, 0], "max": [0.0, 2.0, -1.0],
                        "top": [["a", "b"], ["a", "b", "c"], ["x"]]})
    base = pd.DataFrame({"layer": ["l1", "l1"], "channel": [0, 1], "max": [1.0, 2.0],
                         "top": [["a", "b"], ["c", "d"]]})     # k shrank for channel 1: compared on 2
    ch = compare.topk_changes(cur, base)
    assert ch[["layer", "channel"]].values.tolist() == [["l1", 1], ["l1", 0]]
    assert ch["jaccard_distance"].tolist() == pytest.approx([1.0, 0.0])
    assert ch["new_in_top"].tolist() == [2, 0]
    dead = compare.dead_neurons(cur, eps=0.0)
    assert dead[["layer", "channel"]].values.tolist() == [["l1", 0], ["l2", 0]]


def test_outliers_and_similar_pairs() -> None:
    rng = np.random.default_rng(0)
    centre = rng.normal(size=16)
    x = centre + 0.05 * rng.normal(size=(50, 16))
    x[17] = rng.normal(size=16)                    # far from the cluster
    x[30] = x[3] * 2.0 + 1e-4                      # same direction as row 3: cosine ~1
    scores = compare.knn_outlier_scores(x, k=5)
    assert int(np.argmax(scores)) == 17
    pairs = compare.similar_pairs(x, threshold=0.99999, k=5)
    assert pairs[["i", "j"]].values.tolist() == [[3, 30]]
    assert compare.knn_outlier_scores(x[:1], k=5).tolist() == [0.0]

    images = _images([("tr/a.png", "A", 1, "train", 1, 0.9), ("te/a.png", "A", 1, "test", 1, 0.9),
                      ("tr/b.png", "B", 2, "train", 2, 0.9), ("te/b2.jpg", "B2", 2, "test", 2, 0.9),
                      ("tr/c.png", "C", 3, "train", 3, 0.9), ("tr/c2.png", "C2", 3, "train", 3, 0.9)])
    ids = np.array(["A", "B", "B2", "C", "C2"], dtype=object)
    near = pd.DataFrame({"i": [1, 3], "j": [2, 4], "similarity": [0.99, 0.98]})
    dup = compare.duplicate_pairs(images, ids, near)
    assert dup[["kind", "path_a", "path_b", "across_splits"]].values.tolist() == [
        ["exact", "tr/a.png", "te/a.png", True], ["near", "tr/b.png", "te/b2.jpg", True],
        ["near", "tr/c.png", "tr/c2.png", False]]


def test_pixel_embedding_finds_reencoded_and_resized_copies() -> None:
    items = generate(ClutterParams(n_train=30, n_test=0, seed=3))
    originals = [Image.fromarray(it["pixels"], "L").convert("RGB") for it in items]

    def jpeg(img: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=75)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    copies = [jpeg(originals[0]), originals[1].resize((58, 58), Image.Resampling.BICUBIC),
              Image.eval(originals[2], lambda v: min(255, int(v * 0.8) + 20))]   # darker, lower contrast
    thumbs = np.stack([pixels.thumbnail(im, 16) for im in originals + copies])
    emb = pixels.embed(thumbs)
    pairs = compare.similar_pairs(emb, threshold=0.95, k=5)
    assert sorted(map(tuple, pairs[["i", "j"]].values.tolist())) == [(0, 30), (1, 31), (2, 32)]
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert not pixels.embed(np.full((1, 256), 7, np.uint8)).any()   # a flat image has no direction


def test_localization_per_class_and_against_a_baseline() -> None:
    artifacts = pd.DataFrame({
        "method": ["cam", "cam", "cam", "gradcam", "gradcam", "cam"],
        "label": pd.array([1, 1, 2, 1, 2, None], dtype="Int64"),
        "pointing_hit": [1.0, 0.0, 1.0, 1.0, 1.0, 1.0], "box_hit": [1.0, 0.0, 0.0, 0.0, 1.0, 1.0],
        "box_iou": [0.8, 0.1, 0.4, 0.3, 0.6, np.nan]})              # the unlabelled, unscored row is left out
    table = compare.localization_by_class(artifacts)
    assert table[["method", "class", "images"]].values.tolist() == [["cam", 1, 2], ["cam", 2, 1],
                                                                     ["gradcam", 1, 1], ["gradcam", 2, 1]]
    assert table["pointing"].tolist() == [0.5, 1.0, 1.0, 1.0]
    base = table.assign(pointing=[1.0, 1.0, 1.0, 0.0])
    per_class, per_method = compare.localization_delta(table, base)
    assert per_class["pointing_delta"].tolist() == [-0.5, 0.0, 0.0, 1.0]
    cam = per_method.set_index("method").loc["cam"]
    assert cam["images"] == 3 and cam["pointing"] == pytest.approx(2 / 3)
    assert cam["pointing_delta"] == pytest.approx(-1 / 3)
    alone, _ = compare.localization_delta(table, None)
    assert alone["pointing_delta"].isna().all()


def test_evaluate_checks() -> None:
    checks = compare.evaluate({"accuracy_drop": 0.05, "flip_fraction": None, "label_noise": 3},
                              {"max_accuracy_drop": 0.02, "max_flip_fraction": 0.1, "max_label_noise": None})
    assert checks == [{"check": "accuracy_drop", "value": 0.05, "limit": 0.02, "failed": True},
                      {"check": "flip_fraction", "value": None, "limit": 0.1, "failed": False}]


# ------------------------------------------------------------------------- snapshots and HTML ---

def test_snapshots_are_atomic_and_latest_is_the_newest_accepted(tmp_path: Path) -> None:
    images = _images([("a.png", "A", 1, "train", 1, 0.9)])
    neurons = pd.DataFrame({"layer": ["l"], "channel": [0], "max": [1.5], "top": [["A"]]})
    assert snapshot.resolve("latest", tmp_path / "none") is None
    assert snapshot.resolve(None, tmp_path) is None
    first = snapshot.save(tmp_path, {"accepted": True, "model_key": "m"}, images, neurons,
                          (np.array(["A"]), np.arange(4, dtype=np.uint8)[None], 2))
    second = snapshot.save(tmp_path, {"accepted": False, "model_key": "m"}, images, neurons, None)
    (tmp_path / "2099-01-01T00-00-00.000000").mkdir()     # a folder without a manifest is no snapshot
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, second.name, "2099-01-01T00-00-00.000000"])
    assert snapshot.find_latest(tmp_path) == first
    snap = snapshot.load(first)
    pd.testing.assert_frame_equal(snap.images, images)
    assert snap.neurons["top"].map(list).tolist() == [["A"]] and snap.neurons["max"].tolist() == [1.5]
    assert snap.thumbs(2)["A"].tolist() == [0, 1, 2, 3] and snap.thumbs(16) == {}
    assert snapshot.load(second).thumbs(2) == {}
    with pytest.raises(PipelineError, match="not an audit snapshot"):
        snapshot.resolve(str(tmp_path / "2099-01-01T00-00-00.000000"), tmp_path)


def test_html_section_escapes_user_strings() -> None:
    evil = "/data/<img src=x onerror=alert(1)>.png"
    report = {
        "passed": False, "baseline": None, "regressions": ["1 duplicate <pair>"], "notes": [],
        "checks": [{"check": "duplicates_across_splits", "value": 1, "limit": 0.0, "failed": True}],
        "images": {"files": 2, "unique": 1, "not_extracted": 0},
        "accuracy": {"accuracy": 0.5, "baseline": None, "delta": None, "labelled": 2, "by_split": {"test": 0.5},
                     "per_class": [{"class": 0, "n": 2, "accuracy": 0.5, "baseline": None, "delta": None}]},
        "flips": {"count": 0, "compared": 0, "list": []},
        "localization": {"note": "no explain artifacts", "methods": [], "per_class": []},
        "dead_neurons": {"total": 0, "new": 0, "by_layer": {"features.relu4": {"channels": 8, "dead": [],
                                                                                "new": [], "revived": []}}},
        "topk_changes": {"k": 5, "most_changed": []},
        "outliers": {"layer": "features.relu4", "k": 3, "list": [{"path": evil, "split": "test", "label": 0,
                                                                  "prediction": 0, "score": 0.25}]},
        "duplicates": {"across_splits": 1, "exact_across_splits": 1, "near_across_splits": 0,
                       "pairs": [{"kind": "exact", "similarity": 1.0, "path_a": evil, "split_a": "train",
                                  "path_b": "/x/b.png", "split_b": "test", "across_splits": True}]},
        "label_noise": {"count": 0, "new": 0, "list": []},
    }
    page = render_section(report, ["<zero>"])
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;.png" in page
    assert "&lt;zero&gt;" in page and "&lt;pair&gt;" in page
    assert page.startswith('<div class="audit">') and page.rstrip().endswith("</div>") and "<h2" not in page


# ---------------------------------------------------------------------- the stage, end to end ---

def _write_manifest(folder: Path, rows: list[dict]) -> Path:
    path = folder / "list.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def faulted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A baseline audit of a clean manifest of clutter digits, then the same data with injected
    faults audited against it. Returns the paths involved and both audits' reports."""
    out = tmp_path_factory.mktemp("audit")
    data = out / "data"
    records = Context(compose_config(out, [])).dataset.records
    rows = []
    for r in records.itertuples(index=False):
        rel = Path(r.split) / Path(r.path).name
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(r.path, data / rel)
        rows.append({"path": str(rel), "label": int(r.label), "split": r.split,
                     "box_x0": r.box_x0, "box_y0": r.box_y0, "box_x1": r.box_x1, "box_y1": r.box_y1})
    manifest = _write_manifest(data, rows)
    base = ["data=manifest", f"data.path={manifest}"]

    # 1. baseline: no index yet, so the outliers come from the Parquet mean columns
    first = run_stages(compose_config(out, [*base, "stage=[extract,audit]"]))["stages"]["audit"]
    report_first = json.loads((out / "run" / "audit" / "audit.json").read_text())
    # 2. an unchanged re-run, with the index and explanations: compares cleanly against the first snapshot
    again = run_stages(compose_config(out, [*base, *EXPLAIN, "stage=[index,explain,audit]"]))["stages"]["audit"]
    report_again = json.loads((out / "run" / "audit" / "audit.json").read_text())

    # 3. faults
    train = [r for r in rows if r["split"] == "train"]
    exact, reencoded, resized = train[:3], train[3:5], train[5:7]
    injected = {"exact": [], "near": [], "added": [], "flipped": []}
    for i, r in enumerate(exact):
        rel = f"test/copy_{i}.png"
        shutil.copyfile(data / r["path"], data / rel)
        rows.append({**r, "path": rel, "split": "test"})
        injected["exact"].append((str(data / r["path"]), str(data / rel)))
    for i, r in enumerate(reencoded + resized):
        img = Image.open(data / r["path"])
        rel = f"test/near_{i}." + ("jpg" if i < 2 else "png")
        (img.save(data / rel, quality=90) if i < 2 else
         img.resize((60, 60), Image.Resampling.BILINEAR).save(data / rel))
        rows.append({**r, "path": rel, "split": "test", "box_x0": None, "box_y0": None, "box_x1": None,
                     "box_y1": None})
        injected["near"].append((str(data / r["path"]), str(data / rel)))
    for it in generate(ClutterParams(n_train=10, n_test=0, seed=7)):
        rel = f"test/new_{it['index']}.png"
        Image.fromarray(it["pixels"], "L").save(data / rel)
        rows.append({"path": rel, "label": it["label"], "split": "test"})
        injected["added"].append(str(data / rel))
    # flip the labels of the 6 most confidently predicted train images (not the copied ones) away from
    # their prediction: the audit must see them relabelled and as labels disagreeing with the model
    store_images = Context(compose_config(out, base)).store().images()
    conf = store_images.assign(confidence=[s[0] for s in store_images["top5_scores"]])
    skip = {str(data / r["path"]) for r in exact + reencoded + resized}
    candidates = conf[conf["split"].eq("train") & ~conf["path"].isin(skip)].sort_values("confidence", ascending=False)
    flipped = candidates.head(6)
    by_path = {str(data / r["path"]): r for r in rows}
    for p, pred in zip(flipped["path"], flipped["prediction"]):
        by_path[p]["label"] = (int(pred) + 1) % 10
        injected["flipped"].append(p)
    min_conf = float(flipped["confidence"].min()) - 1e-6
    _write_manifest(data, rows)

    overrides = [*base, *EXPLAIN, "stage=[extract,index,explain,audit]", f"audit.label_noise.min_confidence={min_conf}"]
    with pytest.raises(AuditFailed) as failure:
        run_stages(compose_config(out, overrides))
    report = json.loads((out / "run" / "audit" / "audit.json").read_text())
    return {"out": out, "data": data, "base": base, "injected": injected, "first": first,
            "report_first": report_first, "again": again, "report_again": report_again,
            "report": report, "failure": failure.value, "min_conf": min_conf}


@pytest.mark.slow
def test_first_and_unchanged_audits_pass(faulted: dict) -> None:
    first, r1 = faulted["first"], faulted["report_first"]
    assert first["passed"] and first["baseline"] is None and first["duplicates_across_splits"] == 0
    assert r1["images"]["files"] == 120 and r1["images"]["not_extracted"] == 0
    assert r1["outliers"]["source"] == "parquet" and len(r1["outliers"]["list"]) == 20
    assert r1["duplicates"]["thumbnails_computed"] == 120
    again, r2 = faulted["again"], faulted["report_again"]
    assert again["passed"] and again["baseline"] == Path(first["snapshot"]).name
    assert (again["added"], again["removed"], again["changed"], again["relabelled"], again["flips"]) == (0, 0, 0, 0, 0)
    assert r2["topk_changes"]["compared"] > 0 and r2["topk_changes"]["most_changed"][0]["jaccard_distance"] == 0.0
    assert r2["duplicates"]["thumbnails_computed"] == 0          # reused from the baseline snapshot
    # the index and the Parquet columns hold the same vectors: the same outliers, the same scores
    assert r2["outliers"]["source"] == "index-flat-ip"
    assert [o["path"] for o in r2["outliers"]["list"]] == [o["path"] for o in r1["outliers"]["list"]]
    assert np.allclose([o["score"] for o in r2["outliers"]["list"]],
                       [o["score"] for o in r1["outliers"]["list"]], atol=1e-5)
    assert r1["localization"]["note"].startswith("no explain artifacts") and not r1["localization"]["methods"]
    # localisation per class from the explain stage's table (6 images with boxes, per method)
    loc = r2["localization"]
    assert loc["note"] is None
    assert {m["method"]: m["images"] for m in loc["methods"]} == {"cam": 6, "gradcam": 6, "center (baseline)": 6}
    for method in ("cam", "gradcam"):
        rows = [c for c in loc["per_class"] if c["method"] == method]
        assert sum(c["images"] for c in rows) == 6
        assert all(0 <= c["pointing"] <= 1 and 0 <= c["box_accuracy"] <= 1 for c in rows)
        assert all(c["pointing_baseline"] is None for c in rows)        # the first audit had none
    # the last snapshot's per-neuron top-k sets are the (current) store's top-k queries
    store = Context(compose_config(faulted["out"], faulted["base"])).store()
    neurons = snapshot.load(Path(faulted["report"]["snapshot"])).neurons
    assert len(neurons) == sum(store.channels(layer) for layer in store.layers())
    for layer, channel, top in neurons[["layer", "channel", "top"]].sample(12, random_state=0).itertuples(index=False):
        want = store.topk(layer, int(channel), k=r2["topk_changes"]["k"])
        assert list(top) == want["image_id"].tolist()


@pytest.mark.slow
def test_audit_finds_each_injected_fault(faulted: dict) -> None:
    r, inj = faulted["report"], faulted["injected"]
    # added images: the 10 new ones and the 7 copies are new files
    added = {a["path"] for a in r["images"]["added_list"]}
    assert r["images"]["added"] == 17 and set(inj["added"]) <= added
    assert {b for _, b in inj["exact"] + inj["near"]} <= added
    # flipped labels: relabelled since the baseline, and flagged as disagreeing with a confident prediction
    assert r["images"]["relabelled"] == 6
    assert {x["path"] for x in r["images"]["relabelled_list"]} == set(inj["flipped"])
    noisy = {x["path"] for x in r["label_noise"]["list"]}
    assert set(inj["flipped"]) <= noisy and r["label_noise"]["new"] >= 1
    # duplicates across splits: 3 byte-identical copies (same image id), 4 re-encoded or resized
    dup = r["duplicates"]
    pairs = {(p["path_a"], p["path_b"]) for p in dup["pairs"] if p["across_splits"]}
    pairs |= {(b, a) for a, b in pairs}
    assert dup["exact_across_splits"] == 3 and set(inj["exact"]) <= pairs
    assert dup["near_across_splits"] == 4 and set(inj["near"]) <= pairs
    assert all(p["similarity"] >= 0.95 for p in dup["pairs"] if p["kind"] == "near")
    # localisation is compared with the previous audit's, per method
    for m in r["localization"]["methods"]:
        assert m["pointing_baseline"] is not None
        assert m["pointing_delta"] == pytest.approx(m["pointing"] - m["pointing_baseline"])
    # nothing else changed: same model, same images -> no flips
    assert r["flips"]["count"] == 0 and r["images"]["removed"] == 0 and r["images"]["changed"] == 0
    # and it failed on the duplicates, after writing everything
    assert not r["passed"] and "7 duplicate file pairs across splits (limit 0)" in r["regressions"]
    assert len(r["regressions"]) == sum(c["failed"] for c in r["checks"])
    assert isinstance(faulted["failure"], PipelineError)
    assert "duplicate file pairs across splits" in str(faulted["failure"])
    assert faulted["failure"].result["duplicates_across_splits"] == 7
    html = (faulted["out"] / "run" / "audit" / "section.html").read_text()
    assert "Duplicates across splits: 7" in html and "copy_0.png" in html
    # the failed snapshot is kept but not accepted: `latest` still names the last good one
    snaps = sorted(p for p in (faulted["out"] / "audits").iterdir() if not p.name.startswith("."))
    assert len(snaps) == 3 and snapshot.find_latest(faulted["out"] / "audits") == snaps[1]
    assert Path(r["snapshot"]) == snaps[2]


@pytest.mark.slow
def test_cli_exits_with_status_1_on_a_regression(faulted: dict) -> None:
    out = faulted["out"]
    cmd = [sys.executable, "-m", "pipeline", "stage=audit", f"paths.outputs={out}", "++data.n_train=80",
           "++data.n_test=40", "train.data={n_train:80,n_test:40}", "train.epochs=1", "progress=false",
           "device=cpu", *faulted["base"], f"hydra.run.dir={out / 'cli'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "audit failed" in last and "duplicate file pairs across splits" in last
    assert json.loads((out / "cli" / "audit" / "audit.json").read_text())["passed"] is False
    # report-only mode: the same findings, exit status 0, and the snapshot becomes the accepted baseline
    proc = subprocess.run([*cmd, "audit.enforce=false"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert snapshot.find_latest(out / "audits") == max(p for p in (out / "audits").iterdir()
                                                       if not p.name.startswith("."))


def test_bad_config_is_a_clear_error(make_cfg) -> None:
    with pytest.raises(PipelineError, match="unknown audit.fail_on key 'max_acuracy_drop'.*max_accuracy_drop"):
        run_stages(make_cfg(["stage=audit", "++audit.fail_on.max_acuracy_drop=0.1"]))
