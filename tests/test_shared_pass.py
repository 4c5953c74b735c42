"""One shared forward/backward pass serves saliency, input x gradient, the CAM family and CAM with
the same maps as each method's own call, on models with and without BatchNorm; the split engine
uses it and falls back to each method's own call when the pass fails."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torchvision.models import resnet18

from pipeline import explaining
from pipeline.errors import PipelineError
from pipeline.methods.base import PassNeeds, shared_pass
from pipeline.methods.registry import METHODS, make_method
from pipeline.models.digits import DigitsCNN
from pipeline.data.images import images_to_tensor
from pipeline.runtime import Context
from pipeline.stages import run_stages
from tests.helpers import compose_config

SHARED = ["saliency", "input_x_gradient", "gradcam", "gradcam_plusplus", "xgradcam", "layercam", "hirescam",
          "eigencam", "cam"]


def prepared(names: list[str], model: torch.nn.Module, x0: torch.Tensor) -> dict:
    return {n: make_method(n).prepare(model, x0) for n in names}


@pytest.mark.parametrize("arch", ["digits", "resnet18"])
def test_every_sharing_method_matches_its_own_call(arch: str) -> None:
    torch.manual_seed(0)
    if arch == "digits":
        model, x = DigitsCNN().eval(), torch.randn(5, 1, 64, 64)
    else:
        model, x = resnet18(num_classes=7).eval(), torch.randn(3, 3, 96, 96)
    methods = prepared(SHARED, model, x[:1])
    needs = [m.shared_needs() for m in methods.values()]
    assert all(nd is not None for nd in needs)
    union = needs[0]
    for nd in needs[1:]:
        union = union | nd
    target = torch.arange(x.shape[0]) % 3
    p = shared_pass(model, x, target, union)
    assert torch.equal(p.targets, target)
    for name, method in methods.items():
        own = method.attribute(model, x, target).maps
        got = method.from_pass(model, p).maps
        assert torch.allclose(got, own, rtol=1e-4, atol=1e-6 * float(own.abs().max())), name
    predicted = shared_pass(model, x, None, PassNeeds(input_grad=True))
    assert torch.equal(predicted.targets, model(x).argmax(1))
    assert torch.allclose(methods["saliency"].from_pass(model, predicted).maps,
                          methods["saliency"].attribute(model, x, predicted.targets).maps, atol=1e-7)


def test_methods_with_their_own_passes_do_not_share() -> None:
    model, x0 = DigitsCNN().eval(), torch.randn(1, 1, 64, 64)
    own = [n for n in METHODS if n not in SHARED]
    for name in own:
        try:
            method = make_method(name).prepare(model, x0)
        except Exception:  # noqa: BLE001 - not applicable here (needs a stage): nothing to share either
            continue
        assert method.shared_needs() is None, name
    assert make_method("guided_gradcam").prepare(model, x0).shared_needs() is None


class SideBranch(torch.nn.Module):
    """A conv whose output the logits never see, beside the path that makes them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.side = torch.nn.Conv2d(4, 4, 1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        self.side(a)
        return self.fc(a.mean((2, 3)))


def test_a_layer_that_does_not_feed_the_output_is_named() -> None:
    needs = PassNeeds(frozenset({"side"}), frozenset({"side"}), input_grad=True)
    with pytest.raises(PipelineError, match="Layer 'side' does not feed the model's output"):
        shared_pass(SideBranch().eval(), torch.randn(2, 1, 8, 8), 0, needs)


def test_the_split_engine_shares_one_pass_and_falls_back_to_each_method(tmp_path: Path, monkeypatch) -> None:
    over = ["stage=explain", "explain.select.all=true", "explain.select.split=test",
            "explain.methods=[saliency,gradcam,cam]", "explain.metrics.curves_per_class=1",
            "explain.causal.enabled=false"]
    real, calls = explaining.shared_pass, []
    monkeypatch.setattr(explaining, "shared_pass", lambda *a, **k: calls.append(a[1].shape[0]) or real(*a, **k))
    first = run_stages(compose_config(tmp_path, over))["stages"]["explain"]
    shared = pd.read_parquet(first["scores"]).sort_values(["method", "image_id"]).reset_index(drop=True)
    assert sum(calls) == shared["image_id"].nunique() and first["maps_computed"] == len(shared)

    def broken(*_a: object, **_k: object) -> None:
        raise RuntimeError("out of memory")

    shutil.rmtree(tmp_path / "cache" / "maps")
    monkeypatch.setattr(explaining, "shared_pass", broken)
    second = run_stages(compose_config(tmp_path, over))["stages"]["explain"]
    own = pd.read_parquet(second["scores"]).sort_values(["method", "image_id"]).reset_index(drop=True)
    assert second["maps_computed"] == len(shared)
    for col in ("inside_energy", "pointing_hit", "box_iou", "deletion_auc", "insertion_auc"):
        assert np.allclose(shared[col], own[col], atol=1e-5, equal_nan=True), col


def test_predictions_come_from_the_map_pass_and_then_from_the_store(tmp_path: Path, monkeypatch) -> None:
    """No separate prediction pass: a cold run predicts in the pass that makes the maps, a warm run
    reads the predictions the rows recorded; both equal the model's own argmax."""
    from pipeline.selection import Predictions

    over = ["stage=explain", "explain.select.all=true", "explain.select.split=test",
            "explain.methods=[saliency,gradcam]", "explain.metrics.curves_per_class=1", "explain.causal.enabled=false"]
    seen: list[int] = []
    real = Predictions.forward
    monkeypatch.setattr(Predictions, "forward", lambda self, items: seen.append(len(items)) or real(self, items))
    cfg = compose_config(tmp_path, over)
    first = run_stages(cfg)["stages"]["explain"]
    scores = pd.read_parquet(first["scores"])
    again = run_stages(compose_config(tmp_path, over))["stages"]["explain"]
    assert again["maps_computed"] == 0 and first["maps_computed"] == len(scores)
    assert sum(seen) == 0                                         # neither run needed a prediction pass
    ctx = Context(cfg)
    first_rows = scores.drop_duplicates("image_id").head(6)
    x = images_to_tensor(first_rows["path"].tolist(), ctx.model.transform)
    with torch.no_grad():
        assert first_rows["prediction"].tolist() == ctx.model.module(x).argmax(1).tolist()
    assert (scores["target"] == scores["prediction"]).all()
    assert pd.read_parquet(again["scores"])["prediction"].tolist() == scores["prediction"].tolist()
