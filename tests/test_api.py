"""The library surface from plain Python: run() as the command line does (raising instead of
exiting), load_model / load_dataset returning the stages' bundles, the ActivationStore, and
explain() with a layer on any nn.Module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import pipeline
from pipeline.errors import AuditFailed
from pipeline.data.images import load_image
from pipeline.errors import PipelineError
from pipeline.models.digits import DigitsCNN

TINY = ["++data.n_train=80", "++data.n_test=40", "train.epochs=1", "progress=false", "device=cpu"]


def test_run_load_model_load_dataset_and_the_store(tmp_path: Path) -> None:
    outputs = [f"paths.outputs={tmp_path}", *TINY]
    summary = pipeline.run(["stage=extract", *outputs])
    extract = summary["stages"]["extract"]
    assert extract["processed"] == 120 and Path(summary["run_dir"], "summary.json").is_file()
    bundle = pipeline.load_model(overrides=outputs)
    assert isinstance(bundle.module, nn.Module) and bundle.name == "digits_cnn" and len(bundle.class_names) == 10
    store = pipeline.ActivationStore.open(Path(extract["store"]), bundle.key)
    assert len(store.images()) == 120 and "features.relu4" in store.layers()
    data = pipeline.load_dataset("clutter_digits", overrides=outputs)
    assert len(data.records) == 120 and set(data.records["split"]) == {"train", "test"}
    x = torch.stack([bundle.transform(load_image(p)) for p in data.records["path"][:2]])
    maps = pipeline.explain(bundle.module, x, "gradcam", layer="features.conv3")
    assert maps.shape == (2, 64, 64) and torch.isfinite(maps).all()


def test_run_raises_the_projects_errors_instead_of_exiting(tmp_path: Path) -> None:
    outputs = [f"paths.outputs={tmp_path}", *TINY]
    with pytest.raises(PipelineError, match="unknown stage 'extrct'"):
        pipeline.run(["stage=extrct", *outputs])
    with pytest.raises(PipelineError, match="stage=query reads the activation store"):
        pipeline.run(["stage=query", *outputs])
    assert issubclass(AuditFailed, PipelineError)
    with pytest.raises(PipelineError, match="not a setting of saliency"):
        pipeline.explain(DigitsCNN(), torch.randn(1, 1, 64, 64), "saliency", layer="features.conv1")


def test_explain_names_images_it_cannot_take() -> None:
    model = DigitsCNN()
    with pytest.raises(PipelineError, match=r"first conv reads 1 channel\(s\) but the images have 3"):
        pipeline.explain(model, torch.randn(2, 3, 64, 64), "saliency", target=0)
    with pytest.raises(PipelineError, match=r"For one image \(C,H,W\), pass x\[None\]"):
        pipeline.explain(model, torch.randn(1, 64, 64), "saliency")
    with pytest.raises(PipelineError, match="must be floating point, got torch.uint8"):
        pipeline.explain(model, torch.zeros(1, 1, 64, 64, dtype=torch.uint8), "saliency")
    with pytest.raises(PipelineError, match="must be a torch tensor"):
        pipeline.explain(model, [[0.0]], "saliency")
    assert pipeline.explain(model, torch.randn(2, 1, 64, 64), "saliency", target=0).shape == (2, 64, 64)
