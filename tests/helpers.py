"""Shared test helpers: tiny hand-built models, the activation store compared as a query sees it, the real
config composed for tests, seeded pictures and a page opened in headless Chromium."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict, read_write
from PIL import Image
from torch import nn


class Block(nn.Module):
    """A residual block (conv-bn-relu-conv-bn + skip, relu)."""

    def __init__(self, c: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.down = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + self.down(x))


class TinyResNet(nn.Module):
    """stem -> block (full resolution) -> block2 (stride 2) -> GAP -> fc (5 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.block = Block(8)
        self.block2 = Block(8, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.block2(self.block(self.stem(x)))).flatten(1))


def trained_like(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with non-trivial BatchNorm running statistics, as a trained net has."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def store_state(ctx: Any) -> dict:
    """Everything a query can see: image rows and every layer's stats and top-K, keyed by image id."""
    store = ctx.store()
    images = store.images().sort_values("image_id").reset_index(drop=True)
    state = {"images": images[["image_id", "row_id", "label", "prediction"]]}
    for layer in store.layers():
        parts = sorted((store.root / layer).glob("*.parquet"))
        table = pd.concat([pd.read_parquet(p) for p in parts]).merge(images[["row_id", "image_id"]], on="row_id")
        state[layer] = table.sort_values("image_id").drop(columns="row_id").reset_index(drop=True)
        state[f"{layer}/top"] = [tuple(store.topk(layer, c, 5)["image_id"]) for c in range(store.channels(layer))]
    return state


def assert_same_store(a: dict, b: dict) -> None:
    """Two :func:`store_state` results are equal, frame by frame and value by value."""
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], pd.DataFrame):
            pd.testing.assert_frame_equal(a[k], b[k])
        else:
            assert a[k] == b[k], k


# ---------------------------------------------------------------- config, pictures, browser ---

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
TINY = ["++data.n_train=80", "++data.n_test=40", "train.data={n_train:80,n_test:40}", "train.epochs=1", "progress=false", "device=cpu"]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def compose_config(tmp_path: Path, overrides: list[str] | None = None, tiny: bool = True) -> DictConfig:
    """The real config with outputs under ``tmp_path``; HydraConfig is set as under @hydra.main."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=(TINY if tiny else []) + [f"paths.outputs={tmp_path}"] + (overrides or []),
                      return_hydra_config=True)
    (tmp_path / "run").mkdir(parents=True, exist_ok=True)
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    HydraConfig().set_config(cfg)
    return cfg


def random_png(path: Path, seed: int, size: int = 32) -> Path:
    """A seeded random RGB picture saved at ``path`` (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def open_in_chromium(page: Path, screenshot: Path, full_page: bool = True) -> dict[str, Any]:
    """Load ``page`` in headless Chromium (fresh profile); every lazy image is made eager and awaited.
    Returns console errors, non-file requests, broken image srcs, image count and ``window.__pwned``."""
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install -y chromium chromium-driver)")
    errors: list[str] = []
    external: list[str] = []
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        try:
            browser = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                           args=CHROMIUM_FLAGS, viewport={"width": 1280, "height": 900})
        except PlaywrightError as e:
            pytest.skip(f"Chromium at {CHROMIUM} cannot be launched here: {str(e).splitlines()[0]}")
        try:
            tab = browser.new_page()
            tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            tab.on("pageerror", lambda e: errors.append(str(e)))
            tab.on("request", lambda r: external.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
            tab.goto(page.resolve().as_uri(), wait_until="load")
            tab.evaluate("() => { for (const i of document.images) i.loading = 'eager'; }")
            tab.wait_for_function("() => Array.from(document.images).every(i => i.complete)", timeout=60_000)
            state = tab.evaluate("""() => ({
                images: document.images.length,
                broken: Array.from(document.images).filter(i => i.naturalWidth === 0).map(i => i.getAttribute('src')),
                pwned: window.__pwned === undefined ? null : String(window.__pwned),
                sections: Array.from(document.querySelectorAll('section h2')).map(h => h.textContent)})""")
            tab.screenshot(path=str(screenshot), full_page=full_page)
        finally:
            browser.close()
    return {**state, "errors": errors, "external": external}
