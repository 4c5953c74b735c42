"""Tiny hand-built models shared by the method tests, and the activation store compared as a query sees it."""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
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
