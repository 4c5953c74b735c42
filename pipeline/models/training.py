"""Training of the built-in classifiers: a small, seeded, deterministic loop (tensors in, metrics
out) and the cached checkpoint a recipe names, trained on first use."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.cache import Cache, atomic_write_json, make_key, read_manifest
from pipeline.errors import PipelineError, suggest
from pipeline.models.digits import DigitsCNN, DigitsCNNFC, fold_batchnorm


@dataclass(frozen=True)
class TrainParams:
    """Everything that changes the trained weights."""

    epochs: int = 5
    batch_size: int = 128
    lr: float = 5e-3
    weight_decay: float = 1e-4
    seed: int = 0
    threads: int = 2


@torch.no_grad()
def accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``module`` on (x, y), in eval mode."""
    was_training = module.training
    module.eval()
    correct = sum(int((module(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    module.train(was_training)
    return correct / max(len(x), 1)


def train_classifier(module: nn.Module, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor,
                     y_test: torch.Tensor, p: TrainParams, progress: bool = True) -> dict[str, float]:
    """Train with AdamW and a one-cycle schedule; returns accuracies and timing.

    Seeded shuffling and a fixed intra-op thread count make two CPU runs give identical weights,
    also inside launcher jobs that change the default thread count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(p.threads)
    try:
        return _train(module, x, y, x_test, y_test, p, progress)
    finally:
        torch.set_num_threads(threads)


def _train(module: nn.Module, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor,
           y_test: torch.Tensor, p: TrainParams, progress: bool) -> dict[str, float]:
    torch.manual_seed(p.seed)
    gen = torch.Generator().manual_seed(p.seed)
    opt = torch.optim.AdamW(module.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    steps = p.epochs * ((len(x) + p.batch_size - 1) // p.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.lr, total_steps=steps, pct_start=0.2)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    module.train()
    bar = tqdm(total=steps, desc="train", unit="batch", disable=None if progress else True)
    loss = torch.tensor(0.0)
    for _ in range(p.epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), p.batch_size):
            idx = order[i:i + p.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(module(x[idx]), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    module.eval()
    return {"train_accuracy": accuracy(module, x, y), "test_accuracy": accuracy(module, x_test, y_test),
            "final_loss": float(loss.item()), "train_seconds": time.perf_counter() - start,
            "n_train": len(x), "n_test": len(x_test)}


# --------------------------------------------------------------------------------------------
# The built-in models: train once per (architecture, recipe, data), keep the checkpoint in the cache

TRAIN_VERSION = 2  # 2: the digits trunk's last conv is 1x1
ARCHS: dict[str, type[nn.Module]] = {"digits_cnn": DigitsCNN, "digits_cnn_fc": DigitsCNNFC}


@dataclass(frozen=True)
class Recipe:
    """What a built-in checkpoint is made from: architecture, width, training parameters and the key
    of the training data. Its :attr:`key` names the checkpoint in the cache."""

    arch: str
    width: int
    params: TrainParams
    data_key: str

    @property
    def key(self) -> str:
        return make_key(kind="train", version=TRAIN_VERSION, arch=self.arch, width=self.width,
                        params=self.params.__dict__, data=self.data_key)


@dataclass(frozen=True)
class Trained:
    """A built-in model's folded weights and its training metrics (``checkpoint``: the file)."""

    state: dict[str, torch.Tensor]
    metrics: dict[str, Any]
    trained_now: bool


def recipe(arch: str, width: int, train: Mapping[str, Any], data_key: str) -> Recipe:
    """The recipe from the train settings (keys of :class:`TrainParams`; others are ignored)."""
    if arch not in ARCHS:
        raise PipelineError(f"unknown built-in architecture '{arch}'.{suggest(arch, list(ARCHS))}")
    params = TrainParams(**{k: train[k] for k in TrainParams.__dataclass_fields__ if k in train})
    return Recipe(arch, int(width), params, data_key)


def is_cached(cache: Cache, r: Recipe) -> bool:
    """Whether the recipe's checkpoint is in the cache (nothing is trained to tell)."""
    return read_manifest(cache.path("models", r.key)) is not None


def fetch_or_train(cache: Cache, r: Recipe, data: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                   progress: bool = True) -> Trained:
    """The recipe's checkpoint from the cache, or trained now and cached (atomically, manifest last).

    ``data()`` returns (images (N,C,H,W), labels (N,), train mask (N,) bool); it is called only when
    there is something to train.
    """
    folder = cache.get("models", r.key)
    trained_now = folder is None
    if trained_now:
        x, y, train = data()
        if not bool(train.any()) or bool(train.all()):
            raise PipelineError("training needs both 'train' and 'test' images in the clutter_digits data.")
        torch.manual_seed(r.params.seed)
        net = ARCHS[r.arch](width=r.width, batchnorm=True)
        metrics = train_classifier(net, x[train], y[train], x[~train], y[~train], r.params, progress)
        state = fold_batchnorm(net.state_dict())
        with cache.write("models", r.key, {"arch": r.arch, "metrics": metrics, "params": r.params.__dict__,
                                           "data": r.data_key}) as tmp:
            torch.save(state, tmp / "model.pt")
            atomic_write_json(tmp / "metrics.json", metrics)
        folder = cache.path("models", r.key)
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["checkpoint"] = str(folder / "model.pt")
    return Trained(state, metrics, trained_now)
