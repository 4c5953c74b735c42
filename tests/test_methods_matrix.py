"""Every registered map method on every kind of model, a torch.export program too: maps of the
input's size, finite, the same twice; a method that cannot apply to a model says so in one line,
before any work."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torchvision.models import resnet18

from pipeline.errors import PipelineError
from pipeline.methods.base import NotApplicable
from pipeline.methods.registry import METHODS, make_method
from pipeline.models import build_model
from pipeline.models.digits import DigitsCNN, DigitsCNNFC
from pipeline.models.efficientnet_lite import load_efficientnet_lite0
from tests.helpers import TinyResNet, trained_like

# small settings so the whole matrix stays fast; every other setting is the method's default
FAST = {"smoothgrad": {"samples": 2}, "integrated_gradients": {"steps": 4}, "occlusion": {"window": 32, "stride": 32},
        "rise": {"masks": 16, "cells": 4}}


def _scripted() -> nn.Module:
    torch.manual_seed(0)
    return torch.jit.script(DigitsCNN(width=8).eval())


def _exported() -> nn.Module:
    """A torch.export program of a residual net with BatchNorm, saved and loaded as model=exported does."""
    torch.manual_seed(0)
    net = trained_like(TinyResNet())
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "net.pt2"
        torch.export.save(torch.export.export(net, (torch.randn(2, 3, 64, 64),),
                                              dynamic_shapes=({0: torch.export.Dim("batch")},)), path)
        return build_model(OmegaConf.create({"source": "exported", "path": str(path)})).module


MODELS = {
    "digits_cnn": (lambda: DigitsCNN(width=8), (1, 64, 64)),
    "digits_cnn_fc": (lambda: DigitsCNNFC(width=8), (1, 64, 64)),
    "efficientnet_lite0": (load_efficientnet_lite0, (3, 64, 64)),
    "resnet18": (lambda: resnet18(num_classes=10), (3, 64, 64)),
    "torchscript": (_scripted, (1, 64, 64)),
    "exported": (_exported, (3, 64, 64)),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model_and_input(request: pytest.FixtureRequest) -> tuple[str, nn.Module, torch.Tensor]:
    build, shape = MODELS[request.param]
    torch.manual_seed(0)
    model = build().eval()
    return request.param, model, torch.randn(2, *shape)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_on_every_model(model_and_input, name: str) -> None:
    model_name, model, x = model_and_input
    method = make_method(name, FAST.get(name))
    try:
        method.prepare(model, x[:1])
    except NotApplicable as err:
        message = str(err)
        assert "\n" not in message and len(message) < 400, message
        # only these reasons exist: no hooks on TorchScript, no GAP head without a fitted localizer
        assert (model_name == "torchscript" and method.needs_hooks) or (name == "cam" and model_name == "digits_cnn_fc") \
            or "nothing to guide" in message, message
        return
    assert not (model_name == "torchscript" and method.needs_hooks)
    targets = torch.tensor([1, 3])
    first = method.attribute(model, x, targets)
    again = method.attribute(model, x, targets)
    assert first.maps.shape == (2, *x.shape[-2:])
    assert torch.isfinite(first.maps).all()
    torch.testing.assert_close(first.maps, again.maps, rtol=1e-5, atol=1e-6)
    for extra in first.extras.values():
        assert extra.shape[0] == 2 and torch.isfinite(extra).all()
    assert not first.meta or len(first.meta) == 2
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_library_explain_is_the_registry_method() -> None:
    import pipeline

    torch.manual_seed(0)
    model, x = DigitsCNN(width=8).eval(), torch.randn(3, 1, 64, 64)
    predicted = model(x).argmax(1)
    direct = make_method("gradcam_plusplus").prepare(model, x[:1])(model, x, predicted)
    torch.testing.assert_close(pipeline.explain(model, x, "gradcam_plusplus"), direct)
    ig = pipeline.explain(model, x, "integrated_gradients", target=2, steps=8)
    assert ig.shape == (3, 64, 64) and not torch.equal(ig, pipeline.explain(model, x, "integrated_gradients", target=5,
                                                                            steps=8))
    with pytest.raises(PipelineError, match="unknown explain method 'gradcamm'.*Did you mean: gradcam"):
        pipeline.explain(model, x, "gradcamm")
    with pytest.raises(PipelineError, match="not a setting of saliency"):
        pipeline.explain(model, x, "saliency", steps=3)
