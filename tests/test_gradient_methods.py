"""Integrated Gradients, Input x Gradient, Guided Backprop and Guided Grad-CAM against Captum on
tiny seeded nets (BatchNorm in eval, max-pool, a residual add, in-place ReLUs), plus completeness,
batching invariance, hook hygiene and the errors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from captum.attr import GuidedBackprop as CaptumGuidedBackprop
from captum.attr import GuidedGradCam as CaptumGuidedGradCam
from captum.attr import InputXGradient as CaptumInputXGradient
from captum.attr import IntegratedGradients as CaptumIG
from torch import nn

from pipeline.errors import PipelineError
from pipeline.methods.base import NotApplicable
from pipeline.methods.deconvnet import relu_backward_override
from pipeline.methods.guided import GuidedBackprop, GuidedGradCAM, guided_rule
from pipeline.methods.integrated_gradients import RULES, IntegratedGradients, make_baseline
from pipeline.methods.registry import METHODS
from pipeline.methods.saliency import InputXGradient, input_gradient

TARGETS = [0, 3, 4]


class _Net(nn.Module):
    """conv -> BN -> act -> max-pool -> residual block (conv, act, conv, + skip, act) -> GAP -> linear."""

    def __init__(self, act: type[nn.Module] = nn.ReLU, inplace: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        make = (lambda: act(inplace=inplace)) if act is nn.ReLU else act
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act0 = make()
        self.pool = nn.MaxPool2d(2)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.act1 = make()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act2 = make()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
        self.bn.running_mean.uniform_(-0.2, 0.2)
        self.bn.running_var.uniform_(0.5, 2.0)
        self.bn.weight.data.uniform_(0.5, 1.5)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.act0(self.bn(self.conv0(x))))
        return self.head(self.act2(h + self.conv2(self.act1(self.conv1(h)))))


class _FunctionalNet(nn.Module):
    """ReLUs only as F.relu; an nn.ReLU module exists but the forward never calls it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.unused = nn.ReLU()
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).mean(dim=(2, 3)))


def _x(b: int = 3) -> torch.Tensor:
    return torch.randn(b, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """Equal up to ``tol`` relative to the reference's largest magnitude."""
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * float(expected.detach().abs().max()))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())


@pytest.fixture(autouse=True)
def _quiet_captum():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting backward hooks")
        warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
        yield


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("baseline", ["zero", "blur", "mean"])
def test_integrated_gradients_matches_captum(rule: str, baseline: str) -> None:
    model, x = _Net(inplace=True), _x()
    method = IntegratedGradients(baseline=baseline, steps=12, method=rule, blur_sigma=2.0)
    exp = method.attribute(model, x, TARGETS)
    ref, delta = CaptumIG(model).attribute(x, baselines=make_baseline(x, baseline, 2.0), target=TARGETS,
                                           n_steps=12, method=rule, return_convergence_delta=True)
    _close(exp.extras["attribution"], ref)
    assert torch.equal(exp.maps, exp.extras["attribution"].sum(1))
    torch.testing.assert_close(torch.tensor([m["convergence_delta"] for m in exp.meta]), delta,
                               rtol=0, atol=1e-5 * float(ref.abs().sum()))


class _ViewNet(nn.Module):
    """Flattens a feature map with ``.view``, which a channels-last tensor does not allow."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16 * 16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x))
        return self.fc(h.view(h.shape[0], -1))


def test_integrated_gradients_on_a_model_that_needs_contiguous_inputs() -> None:
    model, x = _ViewNet(), _x()
    exp = IntegratedGradients(steps=8).attribute(model, x, TARGETS)
    _close(exp.extras["attribution"], CaptumIG(model).attribute(x, target=TARGETS, n_steps=8))


def test_integrated_gradients_completeness() -> None:
    """On a smooth (Softplus) net 64 Gauss-Legendre steps account for the score change within 1%."""
    model, x = _Net(act=nn.Softplus), _x()
    with torch.no_grad():
        logits = model(x)
    for baseline in ("zero", "blur"):
        exp = IntegratedGradients(baseline=baseline, steps=64).attribute(model, x, TARGETS)
        for i, meta in enumerate(exp.meta):
            change = meta["score"] - meta["baseline_score"]
            assert abs(change) > 1e-3
            assert abs(float(exp.maps[i].sum()) - change) <= 0.01 * abs(change)
            assert abs(meta["convergence_delta"]) <= 0.01 * abs(change)
            assert meta["score"] == pytest.approx(float(logits[i, TARGETS[i]]), abs=1e-5)


def test_integrated_gradients_batching_does_not_change_the_result() -> None:
    model, x = _Net(), _x()
    runs = [IntegratedGradients(steps=10, method="riemann_middle", internal_batch_size=n).attribute(
        model, x, TARGETS) for n in (1, 7, 64)]
    for run in runs[1:]:
        _close(run.extras["attribution"], runs[0].extras["attribution"], 1e-6)
    single = [IntegratedGradients(steps=10, method="riemann_middle", internal_batch_size=7).attribute(
        model, x[i:i + 1], TARGETS[i]) for i in range(3)]
    _close(torch.cat([s.extras["attribution"] for s in single]), runs[1].extras["attribution"], 1e-6)
    _close(torch.cat([s.maps for s in single]), runs[1].maps, 1e-6)
    assert [s.meta[0]["score"] for s in single] == pytest.approx([m["score"] for m in runs[1].meta], abs=1e-6)


def test_integrated_gradients_key_and_registry() -> None:
    assert "blur_sigma" not in IntegratedGradients().key_settings()
    assert IntegratedGradients(baseline="blur").key_settings()["blur_sigma"] == 10.0
    assert "internal_batch_size" not in IntegratedGradients(internal_batch_size=8).key_settings()
    assert METHODS["integrated_gradients"] is IntegratedGradients


@pytest.mark.parametrize("settings,name", [
    ({"steps": 0}, "steps"), ({"steps": 2.5}, "steps"), ({"method": "riemann_left", "steps": 1}, "steps"),
    ({"baseline": "noise"}, "baseline"), ({"method": "simpson"}, "method"), ({"blur_sigma": 0}, "blur_sigma"),
    ({"internal_batch_size": 0}, "internal_batch_size"), ({"n_steps": 50}, "n_steps"),
])
def test_integrated_gradients_bad_settings(settings: dict, name: str) -> None:
    with pytest.raises(PipelineError, match=f"integrated_gradients.{name}"):
        IntegratedGradients(**settings)


def test_input_x_gradient_matches_captum() -> None:
    model, x = _Net(inplace=True), _x()
    exp = InputXGradient().attribute(model, x, TARGETS)
    ref = CaptumInputXGradient(model).attribute(x, target=TARGETS)
    _close(exp.extras["attribution"], ref)
    _close(exp.maps, ref.sum(1))


@pytest.mark.parametrize("inplace", [False, True])
def test_guided_backprop_matches_captum(inplace: bool) -> None:
    model, x = _Net(inplace=inplace), _x()
    exp = GuidedBackprop().prepare(model, x[:1]).attribute(model, x, TARGETS)
    ref = CaptumGuidedBackprop(model).attribute(x, target=TARGETS)
    _close(exp.extras["attribution"], ref)
    _close(exp.maps, ref.abs().amax(1))
    assert not torch.allclose(exp.extras["attribution"], input_gradient(model, x, TARGETS), atol=1e-4)


@pytest.mark.parametrize("inplace", [False, True])
def test_guided_gradcam_matches_captum(inplace: bool) -> None:
    model, x = _Net(inplace=inplace), _x()
    exp = GuidedGradCAM(layer="conv2").prepare(model, x[:1]).attribute(model, x, TARGETS)
    ref = CaptumGuidedGradCam(model, model.conv2).attribute(x, target=TARGETS, interpolate_mode="bilinear")
    _close(exp.extras["attribution"], ref)
    _close(exp.maps, ref.abs().amax(1))


def test_guided_relu6_backward() -> None:
    """ReLU6 (which Captum leaves alone): positive gradients pass only where 0 < input < 6."""
    inp = torch.tensor([-1.0, 0.0, 0.5, 3.0, 6.0, 7.0, 2.0, 4.0]).requires_grad_()
    grad = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -2.0])
    module = nn.ReLU6(inplace=True)
    with relu_backward_override(module, guided_rule):
        out = module(inp * 1)
    (g,) = torch.autograd.grad(out, inp, grad)
    assert torch.equal(out, F.relu6(inp.detach()))
    assert torch.equal(g, torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("method", [GuidedBackprop(), GuidedGradCAM(layer="conv2"),
                                    IntegratedGradients(steps=4)])
def test_model_left_as_it_was(method) -> None:
    model, x = _Net(inplace=True), _x()
    before = model(x).detach()
    method.prepare(model, x[:1]).attribute(model, x, TARGETS)
    with pytest.raises(PipelineError, match="out of range"):
        method.attribute(model, x, 9)
    assert _hooks(model) == 0
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    assert torch.equal(model(x), before)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", [GuidedBackprop, GuidedGradCAM])
def test_guided_not_applicable_without_relu_modules(method) -> None:
    model, x = _FunctionalNet(), _x(1)
    with pytest.raises(NotApplicable, match="nothing to guide|calls none") as err:
        method(**({"layer": "conv"} if method is GuidedGradCAM else {})).prepare(model, x)
    assert "\n" not in str(err.value) and "saliency" in str(err.value)
    assert _hooks(model) == 0
