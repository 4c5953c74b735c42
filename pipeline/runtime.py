"""The run context shared by every stage: config, cache, device, run folder, dataset and model.

Datasets and models load lazily and once per run. Built-in models are trained on first use (and
cached by content), so any stage can run on its own.
"""

from __future__ import annotations

import logging
import time
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.cache import Cache, atomic_write_json
from pipeline.data import DatasetBundle, load_dataset
from pipeline.data.sources import clutter_key
from pipeline.data.images import images_to_tensor
from pipeline.errors import PipelineError
from pipeline.store import ActivationStore
from pipeline.models import ModelBundle, build_model
from pipeline.models import training
from pipeline.models.layers import guess_default_layers, resolve_layers

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """'auto' takes a GPU when one is present; asking for 'cuda' without one is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError("device=cuda but no CUDA GPU is available. Use device=cpu or device=auto.")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise PipelineError(f"unknown device '{name}'. Use device=auto, device=cpu or device=cuda.")
    return torch.device(name)


def run_dir_from_hydra(default: Path) -> Path:
    """Hydra's output folder for this job when running under Hydra, else ``default``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return default


def show(text: str) -> None:
    """Print a result table for the user and write it to the run's log file too (through the log
    handlers that write files, so the console does not get it twice)."""
    print(text)
    record = logging.LogRecord("pipeline.results", logging.INFO, __file__, 0, text, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


class Context:
    """One run: what every stage reads and where it writes."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.cache = Cache(Path(cfg.paths.cache))
        self.device = resolve_device(str(cfg.device))
        self.run_dir = run_dir_from_hydra(Path(cfg.paths.outputs) / "runs" / time.strftime("%Y-%m-%d/%H-%M-%S"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.summary: dict[str, Any] = {"stages": {}}
        self.progress = bool(cfg.get("progress", True))
        torch.manual_seed(int(cfg.seed))
        np.random.seed(int(cfg.seed))

    @cached_property
    def dataset(self) -> DatasetBundle:
        """The configured dataset; its quarantine table is written into the run folder."""
        data = load_dataset(self.cfg.data, self.cache)
        data.quarantine.to_csv(self.run_dir / "quarantine.csv", index=False)
        self.summary["dataset"] = {"name": data.name, "images": len(data.records),
                                   "quarantined": len(data.quarantine), "key": data.key}
        return data

    @cached_property
    def model(self) -> ModelBundle:
        """The configured model on the run's device; built-in models are trained if not cached."""
        mcfg = self.cfg.model
        if mcfg.source == "builtin":
            trained = self.trained_builtin
            bundle = build_model(mcfg, trained.state)
            bundle.meta["training"] = trained.metrics
        else:
            bundle = build_model(mcfg)
        self.summary["model"] = {"name": bundle.name, "key": bundle.key, "classes": bundle.num_classes}
        return bundle.to(self.device)

    def takes_hooks(self) -> bool:
        """Whether the model takes forward hooks (a TorchScript module does not); a built-in model
        is an nn.Module, so it is not loaded (and trained) just to tell."""
        return self.cfg.model.source == "builtin" or self.model.takes_hooks

    def training_data(self) -> DatasetBundle:
        """The built-in models train on clutter digits: ``data`` when it is clutter digits, else
        ``train.data`` (clutter-digit settings; null = the defaults)."""
        if self.cfg.data.source == "clutter_digits":
            return self.dataset
        return load_dataset(self._training_data_cfg(), self.cache)

    def training_data_key(self) -> str:
        """The key of :meth:`training_data`, without reading it when it is not the run's dataset."""
        if self.cfg.data.source == "clutter_digits":
            return self.dataset.key
        return clutter_key(self._training_data_cfg())

    def _training_data_cfg(self) -> DictConfig:
        return OmegaConf.merge({"source": "clutter_digits"}, self.cfg.train.get("data") or {})

    def recipe(self) -> training.Recipe:
        """The configured built-in model's recipe (a model's own ``train`` settings win)."""
        mcfg = self.cfg.model
        tcfg = OmegaConf.merge(self.cfg.train, mcfg.get("train") or {})
        return training.recipe(str(mcfg.arch), int(mcfg.get("width", 32)), tcfg, self.training_data_key())

    def builtin_is_trained(self) -> bool:
        """Whether the configured built-in model is in the cache already (nothing is trained to tell)."""
        return training.is_cached(self.cache, self.recipe())

    @cached_property
    def trained_builtin(self) -> training.Trained:
        """The configured built-in model's weights and metrics: from the cache, or trained now (once a run)."""
        def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            ds = self.training_data()
            log.info("training %s on %s (%d images): every stage needs the model, and none is cached for "
                     "these settings yet; it is kept for later runs", self.cfg.model.arch, ds.name, len(ds.records))
            recs = ds.records
            x = images_to_tensor(recs["path"].tolist(), build_model(self.cfg.model).transform)
            y = torch.as_tensor(recs["label"].to_numpy(dtype=np.int64))
            return x, y, torch.tensor((recs["split"] == "train").to_numpy(dtype=bool))

        result = training.fetch_or_train(self.cache, self.recipe(), data, self.progress)
        if result.trained_now:
            self.summary.setdefault("trained", []).append(str(self.cfg.model.arch))
        return result

    def layers(self, spec: Any = None) -> list[str]:
        """Layer names from names/globs, or the model's defaults (each block's output and the last conv)."""
        model = self.model
        if spec:
            return resolve_layers(model.module, list(spec) if not isinstance(spec, str) else [spec])
        if model.default_layers:
            return resolve_layers(model.module, model.default_layers)
        return guess_default_layers(model.module, model.input_shape)

    def model_labels(self) -> np.ndarray:
        """The dataset's labels as the model's class indices (-1 where unlabelled or not a model class).

        Labels map by class name when the dataset has names (an ImageFolder of ImageNet class
        folders, say), else they are taken as class indices.
        """
        data, model = self.dataset, self.model
        labels = data.records["label"]
        out = np.full(len(labels), -1, dtype=np.int64)
        known = labels.notna().to_numpy()
        raw = labels.fillna(-1).to_numpy(dtype=np.int64)
        if data.class_names:
            index = {n.lower(): i for i, n in enumerate(model.class_names)}
            lookup = np.array([index.get(n.lower(), -1) for n in data.class_names], dtype=np.int64)
            out[known] = lookup[raw[known]]
        else:
            ok = known & (raw >= 0) & (raw < model.num_classes)
            out[ok] = raw[ok]
        return out

    def store_records(self) -> pd.DataFrame:
        """The dataset's records for the store: labels as model class indices (NA where not a class)."""
        recs = self.dataset.records[["image_id", "path", "label", "split"]].copy()
        labels = self.model_labels()
        recs["label"] = pd.array([int(v) if v >= 0 else pd.NA for v in labels], dtype="Int64")
        return recs

    def store(self, create: bool = False) -> ActivationStore:
        """The activation store of this run's model (``<cache>/store/<model key>``)."""
        ecfg = self.cfg.get("extract") or {}
        return ActivationStore.open(self.cache.root / "store" / self.model.key, self.model.key, create=create,
                                    top_k=int(ecfg.get("top_k", 100)), dtype=str(ecfg.get("dtype", "float32")))

    def finish(self) -> dict[str, Any]:
        """Write summary.json with cache hits and misses; return the summary."""
        self.summary["run_dir"] = str(self.run_dir)
        self.summary["cache"] = self.cache.summary()
        atomic_write_json(self.run_dir / "summary.json", self.summary)
        return self.summary
