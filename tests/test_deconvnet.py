"""Deconvnet: explicit unpool/ReLU/transposed-conv == hooked backward == Captum, plus the errors."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from captum.attr import NeuronDeconvolution
from torch import nn
from torchvision.models import resnet18

from pipeline.errors import PipelineError
from pipeline.methods.deconvnet import deconvnet, deconvnet_explicit
from pipeline.models.digits import DigitsCNN


def _small_net(inplace: bool = False) -> nn.Sequential:
    """Strided, padded, grouped and dilated convs, overlapping and plain max-pools, Dropout."""
    torch.manual_seed(1)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 8, 5, stride=2, padding=2)),
        ("relu1", nn.ReLU(inplace=inplace)),
        ("pool1", nn.MaxPool2d(3, stride=2, padding=1)),
        ("conv2", nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)),
        ("relu2", nn.ReLU(inplace=inplace)),
        ("drop", nn.Dropout(0.5)),
        ("pool2", nn.MaxPool2d(2)),
        ("conv3", nn.Conv2d(8, 6, 3, padding="same")),
        ("relu3", nn.ReLU(inplace=inplace)),
        ("head", nn.Flatten()),
    ])).eval()


def _captum(model: nn.Module, layer: str, x: torch.Tensor, channel: int,
            position: torch.Tensor) -> torch.Tensor:
    module = dict(model.named_modules())[layer]
    y, xx = (int(v) for v in position)
    return NeuronDeconvolution(model, module).attribute(x, neuron_selector=(channel, y, xx))


@pytest.mark.parametrize("layer,channel", [("features.conv2", 3), ("features.relu3", 10),
                                           ("features.pool2", 5), ("features.relu4", 100)])
def test_digits_explicit_hooked_captum_agree(digits: DigitsCNN, layer: str, channel: int) -> None:
    x = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    exp = deconvnet_explicit(digits, x, layer, channel, scale_by_activation=False)
    hooked = deconvnet(digits, x, layer, channel, scale_by_activation=False)
    assert exp.projection.shape == x.shape
    assert exp.projection.abs().sum() > 0
    torch.testing.assert_close(exp.projection, hooked.projection, atol=1e-5, rtol=1e-5)
    assert torch.equal(exp.position, hooked.position)
    for i in range(3):
        # the kept unit is the channel's strongest activation
        fmap = dict(digits.named_modules())[layer]
        acts = {}
        h = fmap.register_forward_hook(lambda m, i_, o: acts.setdefault("a", o))
        digits(x[i:i + 1])
        h.remove()
        y, xx = exp.position[i]
        assert acts["a"][0, channel, y, xx] == acts["a"][0, channel].max()
        torch.testing.assert_close(exp.value[i], acts["a"][0, channel, y, xx].detach())
        ref = _captum(digits, layer, x[i:i + 1], channel, exp.position[i])
        torch.testing.assert_close(exp.projection[i:i + 1], ref, atol=1e-5, rtol=1e-5)


def test_features_trunk_alone(digits: DigitsCNN) -> None:
    trunk = digits.features
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    exp = deconvnet_explicit(trunk, x, "conv4", [7, 8])
    hooked = deconvnet(trunk, x, "conv4", [7, 8])
    torch.testing.assert_close(exp.projection, hooked.projection, atol=1e-5, rtol=1e-5)
    for i, c in enumerate([7, 8]):
        ref = _captum(trunk, "conv4", x[i:i + 1], c, exp.position[i]) * exp.value[i]
        torch.testing.assert_close(exp.projection[i:i + 1], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer,channel", [("relu1", 2), ("pool1", 4), ("conv2", 1),
                                           ("pool2", 6), ("relu3", 5)])
def test_small_net_explicit_hooked_captum_agree(layer: str, channel: int) -> None:
    net = _small_net()
    x = torch.randn(2, 3, 33, 31, generator=torch.Generator().manual_seed(1))
    exp = deconvnet_explicit(net, x, layer, channel, scale_by_activation=False)
    hooked = deconvnet(net, x, layer, channel, scale_by_activation=False)
    assert exp.projection.abs().sum() > 0
    torch.testing.assert_close(exp.projection, hooked.projection, atol=1e-5, rtol=1e-5)
    for i in range(2):
        ref = _captum(net, layer, x[i:i + 1], channel, exp.position[i])
        torch.testing.assert_close(exp.projection[i:i + 1], ref, atol=1e-5, rtol=1e-5)


def test_unit_of_a_linear_layer(digits: DigitsCNN) -> None:
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(7))
    res = deconvnet(digits, x, "fc", 3, scale_by_activation=False)
    assert torch.equal(res.position, torch.zeros(2, 2, dtype=torch.long))
    torch.testing.assert_close(res.value, digits(x)[:, 3])
    ref = NeuronDeconvolution(digits, digits.fc).attribute(x, neuron_selector=(3,))
    torch.testing.assert_close(res.projection, ref, atol=1e-5, rtol=1e-5)


def test_scale_by_activation_multiplies_by_the_value(digits: DigitsCNN) -> None:
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(5))
    unit = deconvnet(digits, x, "features.relu2", 4, scale_by_activation=False)
    scaled = deconvnet(digits, x, "features.relu2", 4)
    assert (scaled.value > 0).all()
    torch.testing.assert_close(scaled.projection, unit.projection * scaled.value.view(-1, 1, 1, 1))


def test_batch_with_mixed_layers_equals_single_images(digits: DigitsCNN) -> None:
    x = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(6))
    layers, channels = ["features.conv1", "features.relu4", "features.pool1"], [2, 17, 9]
    for fn in (deconvnet, deconvnet_explicit):
        batch = fn(digits, x, layers, channels)
        for i in range(3):
            one = fn(digits, x[i:i + 1], layers[i], channels[i])
            torch.testing.assert_close(batch.projection[i:i + 1], one.projection, atol=1e-6,
                                       rtol=1e-5)
            assert torch.equal(batch.position[i], one.position[0])


def test_forward_stops_at_the_layer(digits: DigitsCNN) -> None:
    called = []
    handles = [m.register_forward_hook(lambda *a, n=n: called.append(n))
               for n, m in digits.named_modules() if n in ("features.conv3", "pool", "fc")]
    x = torch.randn(1, 1, 64, 64)
    try:
        deconvnet(digits, x, "features.pool2", 0)
        deconvnet_explicit(digits, x, "features.pool2", 0)
    finally:
        for h in handles:
            h.remove()
    assert called == []


def test_inplace_relu_handled_and_restored() -> None:
    x = torch.randn(2, 3, 33, 31, generator=torch.Generator().manual_seed(2))
    plain = deconvnet(_small_net(False), x, "relu3", 1)
    net = _small_net(True)
    hooked = deconvnet(net, x, "relu3", 1)
    torch.testing.assert_close(hooked.projection, plain.projection)
    torch.testing.assert_close(deconvnet_explicit(net, x, "relu3", 1).projection, plain.projection,
                               atol=1e-5, rtol=1e-5)
    assert all(m.inplace for m in net.modules() if isinstance(m, nn.ReLU))
    assert all(not m._forward_hooks for m in net.modules())


def test_relu6_backward_is_relu_of_gradient() -> None:
    # Small inputs keep activations below 6, so ReLU6 and ReLU nets share switches and positions;
    # the deconvnet backward ignores the forward masks, so the projections must match.
    x = 0.1 * torch.randn(2, 3, 33, 31, generator=torch.Generator().manual_seed(4))
    relu_net = _small_net()
    relu6_net = copy.deepcopy(relu_net)
    for name in ("relu1", "relu2", "relu3"):
        setattr(relu6_net, name, nn.ReLU6())
    a = deconvnet(relu_net, x, "pool2", 3)
    b = deconvnet(relu6_net, x, "pool2", 3)
    torch.testing.assert_close(a.projection, b.projection)
    assert a.projection.abs().sum() > 0


def test_resnet18_hooked_works_explicit_refuses() -> None:
    torch.manual_seed(0)
    net = resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    res = deconvnet(net, x, "layer2", [5, 9])
    assert res.projection.shape == (2, 3, 64, 64)
    assert (res.projection.flatten(1).abs().sum(1) > 0).all()
    assert res.position.shape == (2, 2)
    assert all(m.inplace for m in net.modules() if isinstance(m, nn.ReLU))
    assert all(not m._forward_hooks for m in net.modules())
    with pytest.raises(PipelineError, match=r"cannot invert BatchNorm2d at 'bn1'.*hooked"):
        deconvnet_explicit(net, x, "layer2", 5)


def test_explicit_refuses_non_chain_and_other_layers() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv2(torch.relu(self.conv1(x)))

    x = torch.randn(1, 1, 16, 16)
    with pytest.raises(PipelineError, match="not a plain chain"):
        deconvnet_explicit(Functional().eval(), x, "conv2", 0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with pytest.raises(PipelineError, match="BatchNorm2d"):
        deconvnet_explicit(net, x, "2", 0)
    reflect = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect")).eval()
    with pytest.raises(PipelineError, match="padding_mode"):
        deconvnet_explicit(reflect, x, "0", 0)


def test_user_errors(digits: DigitsCNN) -> None:
    x = torch.randn(2, 1, 64, 64)
    with pytest.raises(PipelineError, match="Did you mean: features.conv2"):
        deconvnet(digits, x, "features.conv_2", 0)
    with pytest.raises(PipelineError, match="channel 99 is out of range.*0..31"):
        deconvnet(digits, x, "features.conv2", 99)
    with pytest.raises(PipelineError, match="3 channels for 2 images"):
        deconvnet(digits, x, "features.conv2", [0, 1, 2])
    with pytest.raises(PipelineError, match="eval"):
        deconvnet(DigitsCNN(), x, "features.conv2", 0)
    with pytest.raises(PipelineError, match="float"):
        deconvnet_explicit(digits, torch.zeros(1, 64, 64), "features.conv2", 0)
