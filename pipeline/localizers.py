"""GAP localizers for CAM on models without a GAP + linear head: the stage-side plumbing behind
:class:`pipeline.methods.cam.CAM`'s ``convert=auto``.

The maths (a trunk + GAP + a softmax-regression Linear fitted with L-BFGS) is
:func:`pipeline.methods.cam.fit_gap_head`; here are the training images' pooled features (from the
activation store's ``mean_*`` columns when it has them, else a forward pass), the accuracies, and
the cache (``cache/models/<key>/``: ``head.pt`` and ``metrics.json``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.cache import atomic_write_json, make_key
from pipeline.data.images import load_image
from pipeline.errors import PipelineError
from pipeline.methods.cam import GapLocalizer, fit_gap_head, pooled_features
from pipeline.runtime import Context
from pipeline.selection import Predictions, labelled_records, record_item

log = logging.getLogger(__name__)

LOCALIZER_VERSION = 1


class StageLocalizers:
    """Fits (or reads from the cache) the GAP localizer a CAM method asks for."""

    def __init__(self, ctx: Context, batch_size: int) -> None:
        self.ctx = ctx
        self.batch_size = batch_size

    def gap_localizer(self, model: nn.Module, layer: str, fit: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
        """The localizer at ``layer`` over ``model`` and facts about its fit (``key``, accuracies)."""
        ctx, bundle = self.ctx, self.ctx.model
        builtin = ctx.cfg.model.source == "builtin"
        data = ctx.training_data() if builtin else ctx.dataset
        key = make_key(kind="cam_localizer", version=LOCALIZER_VERSION, model=bundle.key, layer=layer,
                       data=data.key, fit=fit)
        folder = ctx.cache.get("models", key)
        cached = folder is not None
        if folder is None:
            recs = data.records if builtin else labelled_records(ctx)
            info, state = self._fit(model, layer, data.name, recs, fit)
            with ctx.cache.write("models", key, {"kind": "cam_localizer", **info}) as tmp:
                torch.save(state, tmp / "head.pt")
                atomic_write_json(tmp / "metrics.json", info)
            folder = ctx.cache.path("models", key)
        info = json.loads((folder / "metrics.json").read_text())
        state = torch.load(folder / "head.pt", map_location="cpu", weights_only=True)
        fc = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
        fc.load_state_dict(state)
        localizer = GapLocalizer(model, layer, fc.to(ctx.device)).eval()
        info = {**info, "key": key, "folder": str(folder), "cached": cached}
        log.info("explain: CAM on a GAP localizer at %s (accuracy %.3f, original %.3f)", layer,
                 info["converted_accuracy"], info["original_accuracy"])
        return localizer, info

    def _fit(self, model: nn.Module, layer: str, data_name: str, records: pd.DataFrame, fit: dict[str, Any]
             ) -> tuple[dict[str, Any], dict]:
        """Fit the localizer's Linear on the training images (labels as model class indices); its
        accuracy and the original model's on the test images."""
        bundle = self.ctx.model
        recs = records[records["label"].notna()]
        if recs.empty:
            raise PipelineError(f"the CAM conversion fits a linear layer on labelled images, but dataset "
                                f"{data_name} has no labels of the model's classes. Use data with labels, or "
                                "Grad-CAM (explain.methods without cam), or explain.cam.convert=never.")
        train, test = recs[recs["split"] == "train"], recs[recs["split"] == "test"]
        evaluated_on = "test"
        if train.empty:
            train, test, evaluated_on = recs, recs, "train (no train/test split)"
        elif test.empty:
            test, evaluated_on = train, "train (no test split)"
        log.info("explain: converting %s for CAM at %s: fitting a linear layer on %d images", bundle.name, layer,
                 len(train))
        f_train, source = self._pooled(model, layer, train)
        y_train = torch.as_tensor(train["label"].to_numpy(dtype=np.int64))
        fc = fit_gap_head(f_train, y_train, bundle.num_classes, **fit)
        f_test, _ = self._pooled(model, layer, test)
        y_test = test["label"].to_numpy(dtype=np.int64)
        with torch.no_grad():
            converted = (fc(f_test.float()).argmax(1).numpy() == y_test).mean()
        items = [record_item(r, "") for _, r in test.iterrows()]
        preds = Predictions(self.ctx, self.batch_size)
        preds.forward(items)
        original = (np.array([preds.probs[it.image_id].argmax() for it in items]) == y_test).mean()
        info = {"layer": layer, "original_accuracy": float(original), "converted_accuracy": float(converted),
                "evaluated_on": evaluated_on, "train_images": len(train), "test_images": len(test),
                "features_from": source, "model": bundle.name}
        return info, fc.state_dict()

    def _pooled(self, model: nn.Module, layer: str, recs: pd.DataFrame) -> tuple[torch.Tensor, str]:
        """Spatial means of ``layer`` for ``recs``: the store's ``mean_*`` columns when it has the layer
        and every image, else a forward pass."""
        from_store = self._store_pooled(layer, recs["image_id"].astype(str).tolist())
        if from_store is not None:
            return from_store, "store"
        transform, out = self.ctx.model.transform, []
        paths = recs["path"].tolist()
        step = 256
        for start in range(0, len(paths), step):
            x = torch.stack([transform(load_image(p)) for p in paths[start:start + step]])
            out.append(pooled_features(model, layer, x, batch_size=self.batch_size))
        return torch.cat(out), "forward pass"

    def _store_pooled(self, layer: str, image_ids: list[str]) -> torch.Tensor | None:
        """Pooled features (N,C) of ``layer`` from the activation store, or None when there is no
        store, it lacks the layer, or misses an image."""
        try:
            store = self.ctx.store()
        except PipelineError:
            return None
        values = store.pooled(layer, image_ids) if layer in store.layers() else None
        if values is None:
            return None
        log.info("explain: pooled features of %s for %d images read from the activation store", layer,
                 len(image_ids))
        return torch.from_numpy(values)
