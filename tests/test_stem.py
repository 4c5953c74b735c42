"""The split after the first conv (methods/stem.py): where it applies, and that integrated
gradients and SmoothGrad give the same attributions with it as without."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn

import pipeline.methods.integrated_gradients as ig
import pipeline.methods.saliency as sal
from pipeline.methods.execution import fold_batchnorm
from pipeline.methods.stem import split_stem


class Stemmed(nn.Module):
    """A conv first, then an in-place ReLU (as resnet's stem), a strided conv and a linear head."""

    def __init__(self, residual: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 5, stride=2, padding=2)
        self.relu = nn.ReLU(inplace=True)
        self.body = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                  nn.Linear(32, 5))
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv(x))
        if self.residual:  # the input used a second time: no split
            y = y + x[:, :1, ::2, ::2]
        return self.body(y)


def test_split_rest_of_the_conv_output_is_the_model() -> None:
    torch.manual_seed(0)
    model = Stemmed().eval()
    stem = split_stem(model)
    assert stem is not None and stem.conv is model.conv
    x = torch.randn(4, 3, 16, 16)
    y = model.conv(x)
    torch.testing.assert_close(stem.rest(y), model(x))
    assert torch.equal(y, model.conv(x))  # the in-place ReLU left the given output alone
    torch.testing.assert_close(stem.linear(x) + model.conv.bias.view(1, -1, 1, 1), y)
    g = torch.randn_like(y)
    x.requires_grad_(True)
    (want,) = torch.autograd.grad((model.conv(x) * g).sum(), x)
    torch.testing.assert_close(stem.input_grad(g, x.shape), want)
    assert split_stem(model) is stem  # made once


@pytest.mark.parametrize("case", ["residual", "hooked", "scripted", "linear_first"])
def test_no_split_where_the_input_goes_elsewhere_or_a_hook_would_be_skipped(case: str) -> None:
    model: nn.Module = Stemmed(residual=case == "residual").eval()
    if case == "hooked":
        model.conv.register_forward_hook(lambda *a: None)
    if case == "scripted":
        model = torch.jit.script(model)
    if case == "linear_first":
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    assert split_stem(model) is None


@pytest.mark.parametrize("steps,batch", [(8, 16), (7, 3)])
def test_integrated_gradients_with_the_split_are_the_same(steps: int, batch: int) -> None:
    torch.manual_seed(1)
    model = Stemmed().eval()
    x = torch.randn(3, 3, 16, 16)
    base = ig.make_baseline(x, "blur", 2.0)
    assert split_stem(fold_batchnorm(model, x[:1])) is not None  # the model integrated_gradients runs
    split = ig.integrated_gradients(model, x, [0, 2, 4], base, steps=steps, internal_batch_size=batch)
    with mock.patch.object(ig, "split_stem", lambda m: None):
        plain = ig.integrated_gradients(model, x, [0, 2, 4], base, steps=steps, internal_batch_size=batch)
    assert not split.attribution.requires_grad
    torch.testing.assert_close(split.attribution, plain.attribution, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split.delta, plain.delta, rtol=1e-4, atol=1e-5)


def test_smoothgrad_with_the_split_is_the_same() -> None:
    torch.manual_seed(2)
    model = Stemmed().eval()
    x = torch.randn(2, 3, 16, 16)
    assert split_stem(model) is not None
    split = sal.saliency(model, x, [1, 3], samples=5, batch_size=4)
    with mock.patch.object(sal, "split_stem", lambda m: None):
        plain = sal.saliency(model, x, [1, 3], samples=5, batch_size=4)
    assert not split.grad.requires_grad
    torch.testing.assert_close(split.grad, plain.grad, rtol=1e-5, atol=1e-6)
