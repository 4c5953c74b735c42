"""Data sources: built-in clutter digits, scikit-image photos, an image folder, a manifest file, and the
user's own callable (``data._target_``) returning paths, records or a torch ``Dataset``."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.cache import Cache, atomic_write_bytes, make_key, sha256_file
from pipeline.data.clutter import GENERATOR_VERSION, ClutterParams, generate
from pipeline.data.images import IMAGE_EXTENSIONS, ScanResult, scan_file
from pipeline.errors import PipelineError, suggest
from pipeline.settings import plain

log = logging.getLogger(__name__)

# fragment_boxes: "x0,y0,x1,y1;..." (clutter digits); concepts: extra concept masks "name=mask.png;..."
RECORD_COLUMNS = ["image_id", "path", "label", "split", "box_x0", "box_y0", "box_x1", "box_y1", "mask",
                  "fragment_boxes", "concepts"]
BOX_COLUMNS = ["box_x0", "box_y0", "box_x1", "box_y1"]
DATA_VERSION = 2  # 2: clutter digits carry object masks
PHOTO_NAMES = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
               "camera", "horse", "page", "coins", "moon", "clock", "brick", "grass", "gravel", "colorwheel", "logo")


@dataclass
class DatasetBundle:
    """A dataset's records, its own class names, its quarantined files and a content key."""

    name: str
    records: pd.DataFrame
    class_names: list[str] | None
    quarantine: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame({"path": pd.Series(dtype=str), "reason": pd.Series(dtype=str)}))
    key: str = ""

    def __post_init__(self) -> None:
        if not self.key:
            self.key = make_key(kind="dataset", ids=self.records["image_id"].tolist(),
                                labels=self.records["label"].astype("float64").fillna(-1).tolist(),
                                splits=self.records["split"].tolist())


def _records(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """A records table with the standard columns and dtypes."""
    df = pd.DataFrame(rows, columns=RECORD_COLUMNS)
    df["label"] = df["label"].astype("Int64")
    for c in BOX_COLUMNS:
        df[c] = df[c].astype("float64")
    df["split"] = df["split"].fillna("all").astype(str)
    for c in ("mask", "fragment_boxes", "concepts"):
        df[c] = df[c].astype(object).where(df[c].notna(), None)
    return df.reset_index(drop=True)


def scan(paths: Iterable[str | Path], cache: Cache | None, scope: str | Path
         ) -> tuple[dict[str, ScanResult], pd.DataFrame]:
    """Validate files (cached by path, size and mtime) and warn once per bad file.

    The cache holds one table per ``scope`` (the folder or manifest the paths come from), so a
    re-run after files were added, changed or removed decodes only those files.
    Returns the good files' results by path, and the quarantine table.
    """
    paths = [os.path.abspath(p) for p in paths]
    scope_key = make_key(kind="scan", scope=os.path.abspath(scope))
    index_path = cache.root / "scan" / f"{scope_key}.parquet" if cache else None
    known: dict[tuple[str, int, int], ScanResult] = {}
    if index_path is not None and index_path.exists():
        old = pd.read_parquet(index_path)
        sizes = [None if pd.isna(v) else int(v) for v in old["width"].tolist() + old["height"].tolist()]
        n_old = len(old)
        for i, (p, size, mtime, image_id, reason) in enumerate(zip(
                old["path"].tolist(), old["size"].tolist(), old["mtime_ns"].tolist(),
                old["image_id"].tolist(), old["reason"].tolist())):
            known[(p, size, mtime)] = ScanResult(p, image_id, sizes[i], sizes[n_old + i], reason)
    results: dict[str, ScanResult] = {}
    rows = []
    fresh = 0
    for p in paths:
        try:
            st = os.stat(p)
            sig = (p, st.st_size, st.st_mtime_ns)
        except OSError:
            sig = None
        res = known.get(sig) if sig else None
        if res is None:
            res = scan_file(p)
            fresh += 1
        results[p] = res
        if sig:
            rows.append({"path": p, "size": sig[1], "mtime_ns": sig[2], "image_id": res.image_id,
                         "width": res.width, "height": res.height, "reason": res.reason})
    if index_path is not None and rows and (fresh or len(rows) != len(known)):
        buf = pd.DataFrame(rows).to_parquet(index=False)
        atomic_write_bytes(index_path, buf)
    bad = [(p, r.reason) for p, r in results.items() if r.reason]
    for p, reason in bad:
        log.warning("skipping %s: %s", p, reason)
    quarantine = pd.DataFrame(bad, columns=["path", "reason"]).astype(str)
    good = {p: r for p, r in results.items() if not r.reason}
    return good, quarantine


def _clutter_params(cfg: Any) -> ClutterParams:
    return ClutterParams(**{k: cfg[k] for k in ClutterParams.__dataclass_fields__ if k in cfg})


def clutter_key(cfg: Any) -> str:
    """The clutter-digits dataset's key: generation is a pure function of its parameters, so they
    identify its content (and the key is known without reading the dataset)."""
    return make_key(kind="data", name="clutter_digits", version=DATA_VERSION, generator=GENERATOR_VERSION,
                    params=_clutter_params(cfg).__dict__)


def _clutter(cfg: Any, cache: Cache) -> DatasetBundle:
    """Generate (once, cached by parameters) and return the clutter-digits dataset."""
    p = _clutter_params(cfg)
    key = clutter_key(cfg)
    folder = cache.get("data", key)
    if folder is None:
        with cache.write("data", key, {"name": "clutter_digits", "params": p.__dict__}) as tmp:
            rows = []
            for item in generate(p):
                rel = Path("images") / item["split"] / f"{item['index']:05d}_{item['label']}.png"
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(item["pixels"], "L").save(tmp / rel)
                mask = Path("masks") / rel.relative_to("images")
                (tmp / mask).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(item["mask"].astype(np.uint8) * 255, "L").save(tmp / mask)
                x0, y0, x1, y1 = item["box"]
                rows.append({"path": str(rel), "label": item["label"], "split": item["split"],
                             "box_x0": x0, "box_y0": y0, "box_x1": x1, "box_y1": y1, "mask": str(mask),
                             "fragment_boxes": ";".join(",".join(map(str, b)) for b in item["fragment_boxes"])})
            table = pd.DataFrame(rows)
            table["image_id"] = [sha256_file(tmp / r) for r in table["path"]]
            table.to_parquet(tmp / "manifest.parquet", index=False)
        folder = cache.path("data", key)
    table = pd.read_parquet(folder / "manifest.parquet")
    table["path"] = str(folder) + os.sep + table["path"].astype(str)  # vectorised: 6000 Path joins cost 50 ms
    table["mask"] = str(folder) + os.sep + table["mask"].astype(str)
    return DatasetBundle("clutter_digits", _records(table.to_dict("records")), [str(i) for i in range(10)],
                         key=key)


def _photos(cfg: Any, cache: Cache) -> DatasetBundle:
    """scikit-image's sample photos, written once as PNG files so they have byte-level ids."""
    try:
        import skimage.data
    except ImportError as exc:
        raise PipelineError("data=photos needs the package scikit-image: pip install "
                            "'cnn-explain-pipeline[photos]' (or pip install scikit-image).") from exc

    names = list(cfg.get("names") or PHOTO_NAMES)
    for n in names:
        if not callable(getattr(skimage.data, n, None)):
            raise PipelineError(f"unknown scikit-image photo '{n}'.{suggest(n, PHOTO_NAMES)} "
                                f"Choose from: {', '.join(PHOTO_NAMES)}.")
    key = make_key(kind="data", name="photos", version=DATA_VERSION, names=names)
    folder = cache.get("data", key)
    if folder is None:
        with cache.write("data", key, {"name": "photos", "names": names}) as tmp:
            for n in names:
                arr = np.asarray(getattr(skimage.data, n)())
                if arr.dtype == bool:
                    arr = arr.astype(np.uint8) * 255
                elif arr.dtype != np.uint8:
                    arr = (255 * (arr - arr.min()) / max(float(np.ptp(arr)), 1e-12)).astype(np.uint8)
                Image.fromarray(arr).save(tmp / f"{n}.png")
        folder = cache.path("data", key)
    good, quarantine = scan([folder / f"{n}.png" for n in names], cache, folder)
    rows = [{"image_id": r.image_id, "path": p, "label": None, "split": "all"} for p, r in good.items()]
    return DatasetBundle("photos", _records(rows), None, quarantine)


def _require_dir(path: str | None, what: str) -> Path:
    """A dataset folder that exists and is a folder, else a clear error."""
    if not path:
        raise PipelineError(f"{what}: no path given. Set it, e.g. data.path=/path/to/images.")
    p = Path(os.path.abspath(Path(path).expanduser()))
    if not p.is_dir():
        raise PipelineError(f"{what}: folder '{p}' does not exist. Check data.path.")
    return p


def _sorted(paths: Iterable[Path]) -> list[Path]:
    """Paths in Path order, each split into parts once (comparing Path objects re-splits them)."""
    return sorted(paths, key=lambda f: f.parts)


def _listed(f: Path | os.DirEntry, exts: tuple[str, ...]) -> bool:
    """A visible file (or a link, even a broken one, so that it is reported) with an image extension.
    The name is checked first; a DirEntry answers is_file() from the directory listing, no stat."""
    return (not f.name.startswith(".") and os.path.splitext(f.name)[1].lower() in exts
            and (f.is_file() or f.is_symlink()))


def _imagefolder(cfg: Any, cache: Cache) -> DatasetBundle:
    """A folder of images, flat (no labels) or with one subfolder per class (ImageFolder)."""
    root = _require_dir(cfg.get("path"), "data=imagefolder")
    exts = tuple(e.lower() for e in (cfg.get("extensions") or IMAGE_EXTENSIONS))
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)  # one directory read; Path order within a folder
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    if classes:
        files = [(f, ci) for ci, c in enumerate(classes) for f in _sorted((root / c).rglob("*")) if _listed(f, exts)]
    else:
        files = [(e.path, None) for e in entries if _listed(e, exts)]  # str: 10k Path objects cost 0.15 s
    if not files:
        raise PipelineError(f"data=imagefolder: no images with extensions {', '.join(exts)} under '{root}'. "
                            "Point data.path at a folder of images (flat or one subfolder per class).")
    good, quarantine = scan([f for f, _ in files], cache, root)
    split = str(cfg.get("split") or "all")
    rows = [{"image_id": good[str(f)].image_id, "path": str(f), "label": ci, "split": split}
            for f, ci in files if str(f) in good]
    return DatasetBundle(f"imagefolder:{root.name}", _records(rows), classes or None, quarantine)


def _manifest(cfg: Any, cache: Cache) -> DatasetBundle:
    """A CSV or Parquet file with a ``path`` column and optional label, box, split and mask columns
    (``mask``: a PNG of the image's size, nonzero = object; relative paths as for ``path``)."""
    path = cfg.get("path")
    if not path or not Path(path).expanduser().is_file():
        raise PipelineError(f"data=manifest: file '{path}' does not exist. Set data.path to a CSV or Parquet file.")
    mpath = Path(os.path.abspath(Path(path).expanduser()))
    table = pd.read_parquet(mpath) if mpath.suffix.lower() in (".parquet", ".pq") else pd.read_csv(mpath)
    if "path" not in table.columns:
        raise PipelineError(f"data=manifest: '{mpath}' has no 'path' column (columns: {', '.join(table.columns)}).")
    if table.empty:
        raise PipelineError(f"data=manifest: '{mpath}' lists no images.")
    base = Path(cfg.get("root") or mpath.parent)
    table["path"] = [os.path.abspath(base / p) for p in table["path"].astype(str)]
    if "mask" in table.columns:
        table["mask"] = [None if pd.isna(m) or not str(m) else os.path.abspath(base / str(m)) for m in table["mask"]]
    if "concepts" in table.columns:  # "name=mask.png;..." with each path resolved like `mask`
        table["concepts"] = [None if pd.isna(v) or not str(v).strip() else ";".join(
            f"{n}={os.path.abspath(base / p.strip())}" if sep else item
            for item in str(v).split(";") for n, sep, p in [item.partition("=")]) for v in table["concepts"]]
    class_names = None
    if "label" in table.columns and not pd.api.types.is_numeric_dtype(table["label"]):
        class_names = sorted(table["label"].dropna().astype(str).unique())
        table["label"] = table["label"].map({c: i for i, c in enumerate(class_names)})
    good, quarantine = scan(table["path"], cache, mpath)
    table = table[table["path"].isin(good)].copy()
    table["image_id"] = [good[p].image_id for p in table["path"]]
    for c in RECORD_COLUMNS:
        if c not in table.columns:
            table[c] = None
    return DatasetBundle(f"manifest:{mpath.name}", _records(table[RECORD_COLUMNS].to_dict("records")),
                         class_names, quarantine)


def _pil(image: Any) -> Image.Image | None:
    """A PIL image from a PIL image, a (C, H, W) / (H, W) tensor (float in [0, 1] or uint8) or an
    (H, W[, C]) array; None for anything else."""
    import torch

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)
        image = t.numpy()
    if isinstance(image, np.ndarray) and image.ndim in (2, 3):
        arr = image
        if arr.dtype != np.uint8:
            arr = np.clip(np.asarray(arr, dtype=np.float64) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        return Image.fromarray(arr)
    return None


def _dataset_rows(dataset: Any, target: str, cache: Cache) -> list[dict[str, Any]]:
    """A Dataset of (image, label) written once as PNG files into the cache, keyed by their bytes."""
    pngs: list[tuple[str, bytes]] = []
    labels: list[int | None] = []
    for i in range(len(dataset)):
        item = dataset[i]
        image = _pil(item[0]) if isinstance(item, (tuple, list)) and len(item) == 2 else None
        if image is None:
            got = (f"({', '.join(type(v).__name__ for v in item)})" if isinstance(item, (tuple, list))
                   else type(item).__name__)
            raise PipelineError(f"data._target_={target}: item {i} is {got}, not (image, label) with a PIL image or "
                                "a (C, H, W) tensor. Make __getitem__ return (image, label).")
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
        pngs.append((hashlib.sha256(data).hexdigest(), data))
        label = item[1]
        labels.append(None if label is None else int(label))
    key = make_key(kind="data", name="custom", version=DATA_VERSION, ids=[h for h, _ in pngs])
    folder = cache.get("data", key)
    if folder is None:
        with cache.write("data", key, {"name": f"custom:{target}", "images": len(pngs)}) as tmp:
            for h, data in pngs:
                (tmp / f"{h}.png").write_bytes(data)
        folder = cache.path("data", key)
    return [{"image_id": h, "path": str(folder / f"{h}.png"), "label": y, "split": "all"}
            for (h, _), y in zip(pngs, labels)]


def _custom(cfg: Any, cache: Cache) -> DatasetBundle:
    """The user's callable (``data._target_``, instantiated by Hydra with the config's other keys):
    a list of paths or of records {path, label, split, box, mask}, or a torch Dataset of (image, label)."""
    from torch.utils.data import Dataset

    from pipeline.models.custom import instantiate

    target = cfg.get("_target_")
    own = {"source", "_target_", "split", "root"}
    kwargs = {k: v for k, v in plain(cfg).items() if k not in own}
    result = instantiate(target, kwargs, "data")
    split = str(cfg.get("split") or "all")
    class_names = [str(c) for c in getattr(result, "classes", None) or []] or None
    quarantine = None
    if isinstance(result, Dataset) or (hasattr(result, "__getitem__") and hasattr(result, "__len__")
                                       and not isinstance(result, (list, tuple, str, dict))):
        rows = _dataset_rows(result, str(target), cache)
        for r in rows:
            r["split"] = split
    elif isinstance(result, (list, tuple)) and result:
        items = [{"path": str(r)} if isinstance(r, (str, os.PathLike)) else r for r in result]
        bad = next((i for i, r in enumerate(items) if not isinstance(r, dict) or "path" not in r), None)
        if bad is not None:
            raise PipelineError(f"data._target_={target}: item {bad} is a {type(result[bad]).__name__}, not a path "
                                "or a dict with a 'path' key. Return paths, records {path, label, split, box} or a "
                                "torch Dataset of (image, label).")
        base = Path(cfg.get("root") or os.getcwd()).expanduser()
        table = pd.DataFrame(items)
        table["path"] = [os.path.abspath(base / str(p)) for p in table["path"]]
        if "box" in table.columns:
            boxes = [b if b is not None and not (isinstance(b, float) and np.isnan(b)) else (None,) * 4
                     for b in table.pop("box")]
            for c, values in zip(BOX_COLUMNS, zip(*boxes)):
                table[c] = list(values)
        if "mask" in table.columns:
            table["mask"] = [None if m is None or pd.isna(m) else os.path.abspath(base / str(m)) for m in table["mask"]]
        if "label" in table.columns and not pd.api.types.is_numeric_dtype(table["label"].dropna()):
            class_names = sorted(table["label"].dropna().astype(str).unique())
            table["label"] = table["label"].map({c: i for i, c in enumerate(class_names)})
        if "split" not in table.columns:
            table["split"] = split
        good, quarantine = scan(table["path"], cache, f"custom:{target}")
        table = table[table["path"].isin(good)].copy()
        table["image_id"] = [good[p].image_id for p in table["path"]]
        for c in RECORD_COLUMNS:
            if c not in table.columns:
                table[c] = None
        rows = table[RECORD_COLUMNS].to_dict("records")
    else:
        raise PipelineError(f"data._target_={target} returned {type(result).__name__} "
                            f"{'(empty)' if isinstance(result, (list, tuple)) else ''}: return a non-empty list of "
                            "paths or records {path, label, split, box}, or a torch Dataset of (image, label).")
    name = f"custom:{str(target).rsplit('.', 1)[-1]}"
    if quarantine is None:
        return DatasetBundle(name, _records(rows), class_names)
    return DatasetBundle(name, _records(rows), class_names, quarantine)


SOURCES: dict[str, Callable[[Any, Cache], DatasetBundle]] = {
    "clutter_digits": _clutter,
    "photos": _photos,
    "imagefolder": _imagefolder,
    "manifest": _manifest,
    "custom": _custom,
}


def load_dataset(cfg: Any, cache: Cache) -> DatasetBundle:
    """Build the dataset named by ``cfg.source``; an empty result is a clear error."""
    source = cfg.get("source")
    if source not in SOURCES:
        raise PipelineError(f"unknown data source '{source}'.{suggest(str(source), SOURCES)} "
                            f"Choose one of: {', '.join(SOURCES)}.")
    bundle = SOURCES[source](cfg, cache)
    if bundle.records.empty:
        raise PipelineError(f"data={source}: no usable images ({len(bundle.quarantine)} quarantined). "
                            "Check the path and the files.")
    return bundle
