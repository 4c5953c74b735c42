"""model=exported: a torch.export program loads as a module tree with the original names and
torch.nn layers, gives the original module's outputs, gradients and maps, keys by content, and
every bad file or shape is one line naming the fix. And TorchScript's up-front refusals on the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from pipeline.errors import PipelineError
from pipeline.methods.hooks import capture
from pipeline.methods.registry import METHODS, make_method
from pipeline.models import build_model
from pipeline.models.digits import DigitsCNN
from pipeline.models.layers import guess_default_layers, layer_table
from tests.helpers import TinyResNet, trained_like

Dim = torch.export.Dim
FAST = {"smoothgrad": {"samples": 2}, "integrated_gradients": {"steps": 4}, "occlusion": {"window": 16, "stride": 8},
        "rise": {"masks": 16, "cells": 4}}


def export(model: nn.Module, shape: tuple[int, ...], path: Path, dynamic: object = "batch") -> Path:
    """The README's two lines (``dynamic`` other than 'batch': those dynamic_shapes, None: a fixed batch)."""
    shapes = ({0: Dim("batch")},) if dynamic == "batch" else dynamic
    ep = torch.export.export(model.eval(), (torch.randn(2, *shape),), dynamic_shapes=shapes)
    torch.export.save(ep, path)
    return path


def load(make_cfg, path: Path, *overrides: str):
    return build_model(make_cfg(["model=exported", f"model.path={path}", *overrides]).model)


class Head(nn.Module):
    """conv-BN-ReLU, dropout, GAP, linear: eval-mode semantics (running statistics, no dropout) to keep."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(6, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def test_names_layers_outputs_and_gradients_are_the_originals(make_cfg, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = DigitsCNN(width=8).eval()
    bundle = load(make_cfg, export(net, (1, 64, 64), tmp_path / "d.pt2"))
    tree = bundle.module
    assert [n for n, _ in tree.named_modules()] == [n for n, _ in net.named_modules()]
    assert {n: type(m) for n, m in tree.named_modules() if n} == {n: type(m) for n, m in net.named_modules() if n}
    assert type(tree).__name__ == "DigitsCNN" and not tree.training
    assert bundle.input_shape == (1, 64, 64) and bundle.num_classes == 10 and bundle.takes_hooks
    for batch in (1, 3, 7):  # any batch size, though it was exported on 2
        x = torch.randn(batch, 1, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(tree(x), net(x), rtol=1e-5, atol=1e-5)
    x = torch.randn(3, 1, 64, 64, requires_grad=True)
    (grad,) = torch.autograd.grad(tree(x)[:, 2].sum(), x)
    (want,) = torch.autograd.grad(net(x)[:, 2].sum(), x)
    torch.testing.assert_close(grad, want)
    with torch.no_grad(), capture(tree, "features.relu3") as got, capture(net, "features.relu3") as ref:
        tree(x), net(x)
    torch.testing.assert_close(got.output, ref.output)
    assert [(li.name, li.type, li.shape) for li in layer_table(tree, (1, 64, 64))] == \
        [(li.name, li.type, li.shape) for li in layer_table(net, (1, 64, 64))]


def test_blocks_batchnorm_and_dropout_keep_eval_semantics(make_cfg, tmp_path: Path) -> None:
    torch.manual_seed(0)
    for i, (net, shape) in enumerate([(trained_like(TinyResNet()), (3, 32, 32)), (trained_like(Head()), (3, 16, 16)),
                                      (torchvision.models.resnet18(num_classes=10).eval(), (3, 64, 64))]):
        tree = load(make_cfg, export(net, shape, tmp_path / f"{i}.pt2")).module
        x = torch.randn(3, *shape)
        with torch.no_grad():
            torch.testing.assert_close(tree(x), net(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(tree(x), tree(x), rtol=0, atol=0)  # no dropout
        assert guess_default_layers(tree, shape) == guess_default_layers(net, shape)
    assert isinstance(tree.get_submodule("layer1.0.bn1"), nn.BatchNorm2d) and not tree.layer1[0].bn1.training
    assert type(tree.get_submodule("layer1.0")).__name__ == "BasicBlock"
    assert isinstance(tree.get_submodule("layer1"), nn.Sequential) and isinstance(tree.fc, nn.Linear)


def test_every_method_gives_the_original_modules_maps(make_cfg, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = trained_like(TinyResNet())
    tree = load(make_cfg, export(net, (3, 32, 32), tmp_path / "r.pt2")).module
    x, targets = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    for name in METHODS:
        want = make_method(name, FAST.get(name)).prepare(net, x[:1])
        got = make_method(name, FAST.get(name)).prepare(tree, x[:1])
        assert got.key_settings() == want.key_settings(), name
        torch.testing.assert_close(got(tree, x, targets), want(net, x, targets), rtol=1e-4, atol=1e-5, msg=name)


def test_the_key_is_the_programs_content(make_cfg, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = DigitsCNN(width=8).eval()
    first = load(make_cfg, export(net, (1, 64, 64), tmp_path / "a.pt2")).key
    assert load(make_cfg, tmp_path / "a.pt2").key == first
    assert load(make_cfg, export(net, (1, 64, 64), tmp_path / "again.pt2")).key == first
    with torch.no_grad():
        net.fc.bias[0] += 1
    assert load(make_cfg, export(net, (1, 64, 64), tmp_path / "b.pt2")).key != first


class TwoInputs(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x + y).mean((2, 3))


class TwoOutputs(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.mean((2, 3)), x.amax((2, 3))


def _bad_files(folder: Path) -> dict[str, tuple[Path, list[str]]]:
    """name -> (file, extra overrides) for each kind of bad input to model=exported."""
    torch.manual_seed(0)
    net = DigitsCNN(width=8).eval()
    (folder / "junk.pt2").write_bytes(b"not a program")
    torch.jit.script(net).save(str(folder / "scripted.pt"))
    torch.save(net.state_dict(), folder / "state.pt")
    good = export(net, (1, 64, 64), folder / "good.pt2")
    ep = torch.export.export(TwoInputs(), (torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)))
    torch.export.save(ep, folder / "two_inputs.pt2")
    train = DigitsCNN(width=8, batchnorm=True).train()
    torch.export.save(torch.export.export(train, (torch.randn(2, 1, 64, 64),), dynamic_shapes=({0: Dim("batch")},)),
                      folder / "train.pt2")
    return {
        "missing": (folder / "missing.pt2", []),
        "junk": (folder / "junk.pt2", []),
        "torchscript": (folder / "scripted.pt", []),
        "state_dict": (folder / "state.pt", []),
        "fixed_batch": (export(net, (1, 64, 64), folder / "fixed.pt2", dynamic=None), []),
        "bounded_batch": (export(net, (1, 64, 64), folder / "bounded.pt2", dynamic=({0: Dim("b", max=16)},)), []),
        "size": (good, ["model.image_size=32"]),
        "channels": (good, ["model.channels=3"]),
        "two_outputs": (export(TwoOutputs().eval(), (3, 8, 8), folder / "two_outputs.pt2"), []),
        "two_inputs": (folder / "two_inputs.pt2", []),
        "training_mode": (folder / "train.pt2", []),
    }


BAD = {  # what each one-line error must say: the problem and the fix
    "missing": ["does not exist", "torch.export.save"],
    "junk": ["is not a torch.export program", "torch.export.export"],
    "torchscript": ["is a TorchScript file", "model=torchscript"],
    "state_dict": ["torch.save checkpoint", "model.weights_path"],
    "fixed_batch": ["batches of exactly 2", "Dim('batch')"],
    "bounded_batch": ["batches of 1..16", "no min or max"],
    "size": ["takes 64x64 images but model.image_size=32", "set model.image_size=64"],
    "channels": ["takes 1-channel images but model.channels=3", "model.channels=1"],
    "two_outputs": ["returns tuple outputs", "class scores only"],
    "two_inputs": ["takes 2 inputs", "forward takes only the images"],
    "training_mode": ["training mode", "model.eval()"],
}


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_bad_files_and_shapes_are_one_line_errors(make_cfg, tmp_path: Path) -> None:
    files = _bad_files(tmp_path)
    for name, (path, extra) in files.items():
        with pytest.raises(PipelineError) as err:
            load(make_cfg, path, *extra)
        message = str(err.value)
        assert "\n" not in message and all(part in message for part in BAD[name]), (name, message)
    with pytest.raises(PipelineError, match="is a torch.export program, not a TorchScript file: load it with "
                                            "model=exported"):
        build_model(make_cfg(["model=torchscript", f"model.path={files['size'][0]}"]).model)
    with pytest.raises(PipelineError, match="torch.save checkpoint.*model.weights_path"):
        build_model(make_cfg(["model=torchscript", f"model.path={files['state_dict'][0]}"]).model)
    with pytest.raises(PipelineError, match=r"does not run on a \(1, 3, 64, 64\) input.*Set model.channels"):
        build_model(make_cfg(["model=torchscript", f"model.path={files['torchscript'][0]}", "model.image_size=64"]).model)


def test_dynamic_height_and_width_need_the_image_size(make_cfg, tmp_path: Path) -> None:
    net = DigitsCNN(width=8).eval()
    side = Dim("side", min=16, max=128)
    path = export(net, (1, 64, 64), tmp_path / "hw.pt2", dynamic=({0: Dim("batch"), 2: side, 3: side},))
    with pytest.raises(PipelineError, match="dynamic height and width: set model.image_size"):
        load(make_cfg, path)
    assert load(make_cfg, path, "model.image_size=48").input_shape == (1, 48, 48)
    with pytest.raises(PipelineError, match=r"does not run on a \(1, 1, 8, 8\) input.*model.image_size"):
        load(make_cfg, path, "model.image_size=8")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_cli_refusals_are_one_line_and_write_nothing(tmp_path: Path) -> None:
    """A TorchScript file to model=exported, and stage=extract on TorchScript: exit 2, one line."""
    scripted = tmp_path / "digits.pt"
    torch.jit.script(DigitsCNN(width=8).eval()).save(str(scripted))
    runs = {
        "model=exported": (["stage=layers", "model=exported", f"model.path={scripted}"], "is a TorchScript file"),
        "model=torchscript": (["stage=[explain,extract]", "model=torchscript", f"model.path={scripted}",
                               "model.channels=1", "model.image_size=64"], "stage=extract records layer activations"),
    }
    for name, (args, says) in runs.items():
        out = tmp_path / name.removeprefix("model=")
        proc = subprocess.run([sys.executable, "-m", "pipeline", *args, f"paths.outputs={out}", "progress=false"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr
        assert not [p for p in (out / "cache").rglob("*") if p.is_file()]
