"""The CAM variants that reweight one layer's channels, against pytorch-grad-cam's classes (its maps
are ours min-max scaled), on tiny hand-built models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import EigenCAM as RefEigenCAM
from pytorch_grad_cam import GradCAM as RefGradCAM
from pytorch_grad_cam import GradCAMPlusPlus as RefGradCAMPlusPlus
from pytorch_grad_cam import HiResCAM as RefHiResCAM
from pytorch_grad_cam import LayerCAM as RefLayerCAM
from pytorch_grad_cam import XGradCAM as RefXGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from pipeline.errors import PipelineError
from pipeline.methods.base import NotApplicable
from pipeline.methods.gradcam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM

PAIRS = [(GradCAM, RefGradCAM), (GradCAMPlusPlus, RefGradCAMPlusPlus), (XGradCAM, RefXGradCAM),
         (LayerCAM, RefLayerCAM), (HiResCAM, RefHiResCAM), (EigenCAM, RefEigenCAM)]


class Block(nn.Module):
    """A residual block (conv-bn-relu-conv-bn + skip, relu)."""

    def __init__(self, c: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.down = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + self.down(x))


class Net(nn.Module):
    """stem -> block (full resolution) -> block2 (stride 2) -> GAP -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.block = Block(8)
        self.block2 = Block(8, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.block2(self.block(self.stem(x)))).flatten(1))


@pytest.fixture(scope="module")
def net() -> Net:
    torch.manual_seed(0)
    model = Net()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics, as a trained net has
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _minmax(maps: torch.Tensor) -> np.ndarray:
    flat = maps.flatten(1)
    lo, hi = flat.amin(1)[:, None, None], flat.amax(1)[:, None, None]
    return ((maps - lo) / (hi - lo + 1e-7)).numpy()


@pytest.mark.parametrize(("ours", "ref"), PAIRS, ids=[p[0].name for p in PAIRS])
@pytest.mark.parametrize("layer", ["block", "block2"])
def test_matches_pytorch_grad_cam(net: Net, ours, ref, layer: str) -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 3, 16, 16)
    targets = [0, 3, 4]
    with ref(model=net, target_layers=[dict(net.named_modules())[layer]]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
    maps = ours(layer=layer).attribute(net, x, torch.tensor(targets)).maps
    assert maps.shape == (3, 16, 16) and (maps >= 0).all()
    # pytorch-grad-cam scales the low-resolution map before resizing it (cv2, half-pixel bilinear)
    # and ours after the resize, so at half resolution the extremes can differ by interpolation
    tol = 1e-4 if layer == "block" else 2e-3
    np.testing.assert_allclose(_minmax(maps), theirs, rtol=tol, atol=tol)


def test_batched_equals_one_by_one_and_default_layer(net: Net) -> None:
    torch.manual_seed(2)
    x = torch.randn(4, 3, 16, 16)
    for cls, _ in PAIRS:
        method = cls().prepare(net, x[:1])
        assert method.settings["layer"] == "block2"  # the layer the GAP head reads
        batched = method(net, x, torch.tensor([0, 1, 2, 3]))
        single = torch.cat([method(net, x[i:i + 1], i) for i in range(4)])
        torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-6)


def test_gradient_cams_depend_on_the_class_and_eigencam_does_not(net: Net) -> None:
    torch.manual_seed(3)
    x = torch.randn(1, 3, 16, 16)
    for cls in (GradCAMPlusPlus, XGradCAM, LayerCAM, HiResCAM):
        m = cls(layer="block")
        assert not torch.allclose(m(net, x, 0), m(net, x, 4))
    eigen = EigenCAM(layer="block")
    torch.testing.assert_close(eigen(net, x, 0), eigen(net, x, 4))


def test_hooks_removed_and_clear_errors(net: Net) -> None:
    x = torch.randn(1, 3, 16, 16)
    LayerCAM(layer="block").attribute(net, x, 1)
    assert all(not m._forward_hooks for m in net.modules())
    with pytest.raises(PipelineError, match="Unknown layer 'blokc'.*Did you mean: block"):
        GradCAM(layer="blokc").prepare(net, x)
    with pytest.raises(PipelineError, match="Grad-CAM\\+\\+ needs a convolutional layer.*'fc'"):
        GradCAMPlusPlus(layer="fc").prepare(net, x)
    with pytest.raises(PipelineError, match="not a setting of xgradcam.*Settings: layer"):
        XGradCAM(layers="block")
    with pytest.raises(PipelineError, match="out of range"):
        GradCAM(layer="block")(net, x, 9)
    scripted = torch.jit.script(net)
    with pytest.raises(NotApplicable, match="HiRes-CAM needs forward hooks, which TorchScript"):
        HiResCAM().prepare(scripted, x)
