"""A small, seeded, deterministic training loop for the built-in classifiers (tensors in, metrics out)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm


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
