"""Causal reliance for a whole split: the model's predictions on object-only, context-only and
mixed variants of every labelled image with a box or mask (Xiao et al. 2020's Backgrounds
Challenge, built from the dataset's own objects).

object_only keeps the object's mask (or box); context_only fills the object's whole box, so no
silhouette is left; the mixed variants paste the object at its own place onto another image's
context_only. Predictions are batched (the four variants of a chunk in one forward pass each) and kept per image
x variant x fill in ``cache/causal/<fill>/<key>/part-*.parquet`` (the map store's parts), so a
re-run predicts only new images. Shared by stage=explain (``explain.select.all``) and stage=audit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from PIL import Image

from pipeline.pictures import Tile, display_image, panel, safe_name
from pipeline.cache import make_key
from pipeline.data.images import load_image
from pipeline.errors import PipelineError
from pipeline.explaining import batch_objects, object_digest
from pipeline.methods.metrics import box_masks
from pipeline.methods.variants import FILLS, VARIANTS, context_only, fill_image, object_only, paste
from pipeline.reliance.causal import causal_table, choose_partners
from pipeline.runtime import Context
from pipeline.selection import Item
from pipeline.store.maps import MapStore, row_key

log = logging.getLogger(__name__)

VERSION = 2  # 2: context_only fills the object's box
MEAN_SAMPLE = 64  # images whose mean colour is the `mean` fill (a seeded sample of the split)
FILL_WHY = ("mean (default): the dataset's mean colour removes what the filled region shows without adding "
            "colour or texture the model could read; blur keeps the region's colours and rough shape, which leak "
            "object evidence into context_only; constant is a fixed value in normalised units")


def hidden(objects: Any) -> torch.Tensor:
    """What context_only fills: the object's whole box (its mask's bounding box), as Xiao et al.'s
    Only-BG-B does: filling the mask alone leaves the object's silhouette, which a model still reads
    (on the built-in digits 75% of the 8s kept their label from the silhouette)."""
    h, w = objects.masks.shape[-2:]
    boxes = torch.nan_to_num(objects.boxes, nan=0.0)
    return (box_masks(boxes, h, w) | objects.masks) & objects.present[:, None, None]


class CausalChecker:
    """Predictions on the four variants of each labelled image with an object."""

    def __init__(self, ctx: Context, ccfg: DictConfig) -> None:
        self.ctx, self.ccfg = ctx, ccfg
        self.fill = str(ccfg.fill)
        if self.fill not in FILLS:
            raise PipelineError(f"explain.causal.fill={self.fill} is not a fill: use one of {', '.join(FILLS)}.")
        self.problems: list[dict[str, str]] = []

    def _tensors(self, items: Sequence[Item]) -> tuple[torch.Tensor, Any]:
        bundle = self.ctx.model
        pictures = [load_image(it.path) for it in items]
        x = torch.stack([bundle.transform(p) for p in pictures])
        return x, batch_objects(items, [p.size for p in pictures], bundle.transform, tuple(x.shape[-2:]),
                                self.problems)

    def _filled(self, x: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
        return fill_image(x, self.fill, mean=mean, constant=float(self.ccfg.constant),
                          blur_sigma=float(self.ccfg.blur_sigma))

    def mean_colour(self, items: Sequence[Item]) -> torch.Tensor | None:
        """The dataset mean colour (normalised units) over a seeded sample, for ``fill=mean``."""
        if self.fill != "mean":
            return None
        rng = np.random.default_rng(int(self.ccfg.seed))
        pick = np.sort(rng.choice(len(items), size=min(MEAN_SAMPLE, len(items)), replace=False))
        x = torch.stack([self.ctx.model.transform(load_image(items[i].path)) for i in pick])
        return x.mean(dim=(0, 2, 3)).double().round(decimals=4).float()

    def run(self, items: Sequence[Item], predicted: Sequence[int], keep: np.ndarray, per_call: int) -> pd.DataFrame:
        """One row per labelled image with an object (this shard's: ``keep``): label, prediction
        on the full image and on each variant (-1 for a mixed variant without a partner)."""
        use = [i for i, it in enumerate(items) if it.label is not None and (it.box is not None or it.mask)]
        if not use:
            return pd.DataFrame()
        labels = np.array([items[i].label for i in use])
        seed = int(self.ccfg.seed)
        same, rand = choose_partners(labels, True, seed), choose_partners(labels, False, seed + 1)
        mean = self.mean_colour([items[i] for i in use])
        settings = {"fill": self.fill, "constant": float(self.ccfg.constant), "blur_sigma": float(self.ccfg.blur_sigma),
                    "mean": None if mean is None else mean.tolist()}
        store = MapStore(self.ctx.cache.root, self.fill, make_key(kind="causal", version=VERSION, model=self.ctx.model.key,
                                                                  settings=settings), 0, kind="causal")
        pid = [items[use[j]].image_id if j >= 0 else None for j in same], \
            [items[use[j]].image_id if j >= 0 else None for j in rand]
        keys = [row_key(items[i].image_id, items[i].label, [object_digest(items[i]), pid[0][n], pid[1][n]])
                for n, i in enumerate(use)]
        known = set(store.index()["row_key"])
        todo = [n for n, i in enumerate(use) if keep[i] and keys[n] not in known]
        for start in range(0, len(todo), per_call):
            chunk = todo[start:start + per_call]
            store.write(self._predict(chunk, use, items, same, rand, keys, mean))
        mine = [n for n, i in enumerate(use) if keep[i]]
        got = store.read([keys[n] for n in mine]).set_index("row_key").reindex([keys[n] for n in mine])
        names = self.ctx.model.class_names
        return pd.DataFrame({"image_id": [items[use[n]].image_id for n in mine],
                             "path": [items[use[n]].path for n in mine],
                             "label": labels[mine], "class_name": [names[int(c)] for c in labels[mine]],
                             "prediction": np.asarray(predicted)[[use[n] for n in mine]],
                             **{v: got[v].to_numpy() for v in VARIANTS},
                             "cached": [keys[n] in known for n in mine]}).query("object_only >= 0")

    def _predict(self, chunk: list[int], use: list[int], items: Sequence[Item], same: np.ndarray, rand: np.ndarray,
                 keys: list[str], mean: torch.Tensor | None) -> pd.DataFrame:
        """Variant predictions of one chunk; partners' contexts come from their own objects."""
        x, obj = self._tensors([items[use[n]] for n in chunk])
        filled = self._filled(x, mean)
        contexts = {}
        for name, partners in (("same", same), ("rand", rand)):
            idx = [int(partners[n]) for n in chunk]
            px, pobj = self._tensors([items[use[j if j >= 0 else n]] for j, n in zip(idx, chunk)])
            ctx_img = context_only(px, hidden(pobj), self._filled(px, mean))
            contexts[name] = (ctx_img, torch.tensor([j >= 0 for j in idx]) & pobj.present)
        variants = {"object_only": object_only(x, obj.masks, filled), "context_only": context_only(x, hidden(obj), filled),
                    "mixed_same": paste(x, obj.masks, contexts["same"][0]),
                    "mixed_rand": paste(x, obj.masks, contexts["rand"][0])}
        module, dev = self.ctx.model.module, self.ctx.device
        preds = {}
        with torch.no_grad():
            for v, xv in variants.items():
                preds[v] = module(xv.to(dev)).argmax(1).cpu().numpy()
        for v, flag in (("mixed_same", contexts["same"][1]), ("mixed_rand", contexts["rand"][1])):
            preds[v] = np.where(flag.numpy(), preds[v], -1)
        for v in ("object_only", "context_only"):  # no usable object: not a causal test (listed in problems)
            preds[v] = np.where(obj.present.numpy(), preds[v], -1)
        for n, ok in zip(chunk, obj.present.tolist()):
            if not ok:
                log.warning("causal: %s has no usable box or mask; skipped", items[use[n]].path)
        return pd.DataFrame({"row_key": [keys[n] for n in chunk], "image_id": [items[use[n]].image_id for n in chunk],
                             "target": [items[use[n]].label for n in chunk], **preds})

    def examples(self, rows: pd.DataFrame, classes: Sequence[str], folder: Path, n: int,
                 by_id: dict[str, Item], mean: torch.Tensor | None) -> dict[str, str]:
        """One PNG per class name in ``classes``: ``n`` of its images as full / object_only /
        context_only, each titled with the prediction it got (the mixed ones need partners)."""
        folder.mkdir(parents=True, exist_ok=True)
        bundle, names, out = self.ctx.model, self.ctx.model.class_names, {}
        for cname in classes:
            g = rows[rows["class_name"] == cname].head(n)
            if g.empty:
                continue
            x, obj = self._tensors([by_id[i] for i in g["image_id"]])
            filled = self._filled(x, mean)
            cover = hidden(obj)
            tiles = []
            for i, r in enumerate(g.itertuples()):
                views = {"full": (x[i], r.prediction),
                         "object_only": ((torch.where(obj.masks[i], x[i], filled[i])), r.object_only),
                         "context_only": ((torch.where(cover[i], filled[i], x[i])), r.context_only)}
                for view, (img, pred) in views.items():
                    tiles.append(Tile(f"{view}: {names[int(pred)]}", Image.fromarray(
                        display_image(img, bundle.mean, bundle.std))))
            path = folder / f"causal_{safe_name(cname)}.png"
            panel(tiles, f"class {cname}: predictions on the variants", 128).save(path)
            out[cname] = str(path)
        return out


def causal_section(ctx: Context, ccfg: DictConfig, rules: Any, items: Sequence[Item], predicted: Sequence[int],
                   keep: np.ndarray, per_call: int, figures: Path | None) -> tuple[dict[str, Any], pd.DataFrame]:
    """The causal rows of a split (per class and "(all)") with flags, and the per-image rows."""
    checker = CausalChecker(ctx, ccfg)
    rows = checker.run(items, predicted, keep, per_call)
    section: dict[str, Any] = {"fill": checker.fill, "fill_why": FILL_WHY, "rows": [], "flagged_classes": [],
                               "skipped": len(checker.problems)}
    if rows.empty:
        section["note"] = ("no labelled image has a box or mask, so there is no causal test: give the data boxes "
                           "(box_x0..box_y1) or a mask column")
        return section, rows
    table = causal_table(rows, rules.k, rules.min_gap)
    flagged = table[table["flagged"]]["class_name"].tolist()
    if figures is not None:  # a few images of every class as variants, for the report
        mean = checker.mean_colour([it for it in items if it.label is not None and (it.box is not None or it.mask)])
        examples = checker.examples(rows, table["class_name"].iloc[:-1].tolist(), figures, int(ccfg.examples),
                                    {it.image_id: it for it in items}, mean)
        table["figure"] = table["class_name"].map(examples)
    table = table.astype(object)
    section.update(rows=table.where(table.notna(), None).to_dict("records"), flagged_classes=flagged)
    return section, rows
