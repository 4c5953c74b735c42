"""Pictures shared by stages: the model's view of images, receptive-field crops, top-k grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from pipeline.methods.receptive import receptive_field, unit_box
from pipeline.models import ModelBundle
from pipeline.runtime import images_to_tensor, model_view

CROP_SIZE = 64


def rf_crops(model: ModelBundle, views: torch.Tensor, layer: str, ys: np.ndarray, xs: np.ndarray,
             hw: tuple[int, int], size: int = CROP_SIZE) -> torch.Tensor:
    """Receptive-field crops of ``views`` (N,3,H,W) around unit (y, x) of ``layer``, resized to ``size``."""
    field = receptive_field(model.module, layer, model.input_shape)
    out = []
    for img, y, x in zip(views, ys, xs):
        x0, y0, x1, y1 = unit_box(int(y) * hw[1] + int(x), hw, tuple(img.shape[-2:]), field)
        out.append(F.interpolate(img[None, :, y0:y1, x0:x1], size=(size, size), mode="bilinear",
                                 align_corners=False)[0])
    return torch.stack(out)


def save_topk_grid(model: ModelBundle, paths: list[str], layer: str, positions: pd.DataFrame | None,
                   hw: tuple[int, int] | None, out: Path) -> None:
    """Images in one row and, when ``positions`` (columns y, x) are given, their receptive-field
    crops around those units of ``layer`` in a second row (Zeiler & Fergus's top-9 patches)."""
    unique = list(dict.fromkeys(paths))  # the neurons query shows one image k times: decode it once
    where = {p: i for i, p in enumerate(unique)}
    views = model_view(model, images_to_tensor(unique, model.transform))[[where[p] for p in paths]]
    side = CROP_SIZE * 2
    shown = F.interpolate(views, size=(side, side), mode="bilinear", align_corners=False)
    tiles = [shown]
    if positions is not None and hw is not None:
        c = rf_crops(model, views, layer, positions["y"].to_numpy(), positions["x"].to_numpy(), hw, side)
        tiles.append(c)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(torch.cat(tiles), nrow=len(paths), padding=4, pad_value=1.0), out)
