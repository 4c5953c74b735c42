"""Data sources: deterministic clutter digits with correct boxes, bad-file quarantine, mode conversion."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.cache import Cache
from pipeline.data import load_dataset
from pipeline.data.clutter import ClutterParams, generate
from pipeline.data.images import load_image, scan_file
from pipeline.errors import PipelineError
from pipeline.runtime import Context


def test_clutter_generation_is_deterministic_and_boxes_hold_the_digit() -> None:
    p = ClutterParams(n_train=30, n_test=10, seed=3)
    a, b = generate(p), generate(p)
    assert all(np.array_equal(x["pixels"], y["pixels"]) and x["box"] == y["box"] for x, y in zip(a, b))
    assert not np.array_equal(a[0]["pixels"], generate(ClutterParams(n_train=30, n_test=10, seed=4))[0]["pixels"])
    # without clutter every bright pixel belongs to the digit and lies inside its box
    for item in generate(ClutterParams(n_train=30, n_test=10, n_fragments=0)):
        x0, y0, x1, y1 = item["box"]
        inside = np.zeros_like(item["pixels"], dtype=bool)
        inside[y0:y1, x0:x1] = True
        bright = item["pixels"] > 0.1 * 255
        assert bright[inside].any() and not bright[~inside].any()
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
    labels = [x["label"] for x in a]
    assert len(set(labels)) > 5


def test_clutter_source_caches_files_with_byte_ids(tmp_path: Path) -> None:
    cfg = {"source": "clutter_digits", "n_train": 20, "n_test": 10}
    cache = Cache(tmp_path)
    d1 = load_dataset(cfg, cache)
    d2 = load_dataset(cfg, cache)
    assert cache.summary()["data"] == {"hits": 1, "misses": 1}
    pd.testing.assert_frame_equal(d1.records, d2.records)
    assert (d1.records["split"] == "train").sum() == 20 and (d1.records["split"] == "test").sum() == 10
    assert d1.records[["box_x0", "box_y0", "box_x1", "box_y1"]].notna().all().all()
    import hashlib
    row = d1.records.iloc[0]
    assert hashlib.sha256(Path(row["path"]).read_bytes()).hexdigest() == row["image_id"]


def _bad_and_odd_files(root: Path) -> dict[str, str]:
    """Write one file of each bad kind and each odd-but-valid mode; returns bad name -> reason word."""
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (10, 200, 30)).save(root / "good.png")
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    Image.new("L", (300, 300)).save(root / "bomb.png")
    (root / "unreadable.png").symlink_to(root / "does-not-exist.png")
    # valid but unusual modes
    Image.new("L", (16, 16), 128).save(root / "gray.png")
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(root / "rgba.png")
    Image.new("P", (16, 16), 3).save(root / "palette.png")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    Image.fromarray(np.full((16, 16), 65535 // 2, np.uint16)).save(root / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (20, 10), (0, 0, 255)).save(root / "rotated.jpg", exif=exif)
    return {"empty.png": "empty", "text.jpg": "not an image", "truncated.jpg": "truncated",
            "bomb.png": "decompression-bomb", "unreadable.png": "unreadable"}


def test_bad_files_are_quarantined_and_the_run_goes_on(make_cfg, tmp_path: Path, monkeypatch, caplog) -> None:
    folder = tmp_path / "imgs"
    bad = _bad_and_odd_files(folder)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200 * 200)
    ctx = Context(make_cfg(["data=imagefolder", f"data.path={folder}"]))
    data = ctx.dataset
    reasons = dict(zip(data.quarantine["path"].map(lambda p: Path(p).name), data.quarantine["reason"]))
    assert set(reasons) == set(bad)
    for name, word in bad.items():
        assert word in reasons[name], (name, reasons[name])
        assert any(name in r.getMessage() for r in caplog.records)
    assert sorted(Path(p).name for p in data.records["path"]) == sorted(
        ["good.png", "gray.png", "rgba.png", "palette.png", "cmyk.jpg", "sixteen.png", "rotated.jpg"])
    assert pd.read_csv(ctx.run_dir / "quarantine.csv").shape[0] == len(bad)
    assert ctx.summary["dataset"]["quarantined"] == len(bad)
    assert data.records["label"].isna().all()


def test_modes_convert_to_rgb_correctly(tmp_path: Path) -> None:
    _bad_and_odd_files(tmp_path)
    assert load_image(tmp_path / "gray.png").getpixel((0, 0)) == (128, 128, 128)
    assert load_image(tmp_path / "rgba.png").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert load_image(tmp_path / "palette.png").mode == "RGB"
    r, g, b = load_image(tmp_path / "cmyk.jpg").getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60
    assert load_image(tmp_path / "sixteen.png").getpixel((0, 0)) == (127, 127, 127)
    assert load_image(tmp_path / "rotated.jpg").size == (10, 20)
    assert scan_file(tmp_path / "good.png").reason is None


def test_imagefolder_classes_and_manifest(tmp_path: Path) -> None:
    for cls in ("cat", "dog"):
        (tmp_path / "f" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8), (1, 2, 3) if cls == "cat" else (9, 9, 9)).save(tmp_path / "f" / cls / "x.png")
    d = load_dataset({"source": "imagefolder", "path": str(tmp_path / "f")}, Cache(tmp_path / "c"))
    assert d.class_names == ["cat", "dog"] and d.records["label"].tolist() == [0, 1]
    pd.DataFrame({"path": ["f/cat/x.png", "f/dog/x.png"], "label": ["dog", "cat"], "split": ["train", "test"],
                  "box_x0": [1, 2], "box_y0": [1, 2], "box_x1": [5, 6], "box_y1": [5, 6]}).to_csv(
        tmp_path / "m.csv", index=False)
    m = load_dataset({"source": "manifest", "path": str(tmp_path / "m.csv")}, Cache(tmp_path / "c"))
    assert m.class_names == ["cat", "dog"] and m.records["label"].tolist() == [1, 0]
    assert m.records["split"].tolist() == ["train", "test"] and m.records["box_x1"].tolist() == [5.0, 6.0]


def test_rescan_decodes_only_added_or_changed_files(tmp_path: Path, monkeypatch) -> None:
    from pipeline.data import sources

    folder = tmp_path / "f"
    folder.mkdir()
    for i in range(4):
        Image.new("L", (8, 8), i).save(folder / f"{i}.png")
    cache = Cache(tmp_path / "c")
    first = load_dataset({"source": "imagefolder", "path": str(folder)}, cache)
    decoded: list[str] = []
    monkeypatch.setattr(sources, "scan_file", lambda p: decoded.append(Path(p).name) or scan_file(p))
    assert load_dataset({"source": "imagefolder", "path": str(folder)}, cache).key == first.key
    assert decoded == []                                   # nothing new: no file decoded again
    Image.new("L", (8, 8), 200).save(folder / "new.png")   # one added, one changed, one removed
    Image.new("L", (9, 9), 100).save(folder / "1.png")
    (folder / "3.png").unlink()
    again = load_dataset({"source": "imagefolder", "path": str(folder)}, cache)
    assert sorted(decoded) == ["1.png", "new.png"]
    assert sorted(Path(p).name for p in again.records["path"]) == ["0.png", "1.png", "2.png", "new.png"]
    assert again.records["image_id"].iloc[1] != first.records["image_id"].iloc[1]


def test_missing_or_empty_dataset_path_is_a_clear_error(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    with pytest.raises(PipelineError, match="does not exist"):
        load_dataset({"source": "imagefolder", "path": str(tmp_path / "nope")}, cache)
    with pytest.raises(PipelineError, match="no path given"):
        load_dataset({"source": "imagefolder", "path": None}, cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="no images"):
        load_dataset({"source": "imagefolder", "path": str(tmp_path / "empty")}, cache)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    with pytest.raises(PipelineError, match="no usable images"):
        load_dataset({"source": "imagefolder", "path": str(tmp_path / "bad")}, cache)
    with pytest.raises(PipelineError, match="does not exist"):
        load_dataset({"source": "manifest", "path": str(tmp_path / "m.csv")}, cache)
    with pytest.raises(PipelineError, match="unknown data source"):
        load_dataset({"source": "imagefoldr"}, cache)
