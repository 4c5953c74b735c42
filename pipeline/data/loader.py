"""A torch Dataset over a records table, for batched model passes."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.data.images import load_image


class RecordImages(Dataset):
    """Item i: (transformed image of records.path[i], i)."""

    def __init__(self, records: pd.DataFrame, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.paths = records["path"].tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_image(self.paths[i])), i


def record_loader(records: pd.DataFrame, transform: Callable[[Image.Image], torch.Tensor], batch_size: int,
                  num_workers: int = 0) -> DataLoader:
    """In-order batches of (images, positions in ``records``)."""
    return DataLoader(RecordImages(records, transform), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, persistent_workers=False)
