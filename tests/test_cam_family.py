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
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

from pipeline.errors import PipelineError
from pipeline.methods.base import NotApplicable
from pipeline.methods.gradcam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from tests.helpers import TinyResNet as Net
from tests.helpers import trained_like

PAIRS = [(GradCAM, RefGradCAM), (GradCAMPlusPlus, RefGradCAMPlusPlus), (XGradCAM, RefXGradCAM),
         (LayerCAM, RefLayerCAM), (HiResCAM, RefHiResCAM), (EigenCAM, RefEigenCAM)]
SIGNED = [p for p in PAIRS if p[0] is not EigenCAM]  # Eigen-CAM's sign is fixed here, arbitrary there


@pytest.fixture(scope="module")
def net() -> Net:
    torch.manual_seed(0)
    return trained_like(Net())


def _minmax(maps: torch.Tensor) -> np.ndarray:
    flat = maps.flatten(1)
    lo, hi = flat.amin(1)[:, None, None], flat.amax(1)[:, None, None]
    return ((maps - lo) / (hi - lo + 1e-7)).numpy()


@pytest.mark.parametrize(("ours", "ref"), SIGNED, ids=[p[0].name for p in SIGNED])
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


def test_eigencam_sign_follows_the_mean_activation(net: Net) -> None:
    """The reference's map up to the principal component's arbitrary sign, which is fixed here."""
    torch.manual_seed(4)
    x = torch.randn(3, 3, 16, 16)
    method = EigenCAM(layer="block")
    act, _, t = method.activations(net, x, 0)
    ours = method.cam(net, x, t, act, None)
    theirs = torch.from_numpy(get_2d_projection(act.numpy()))
    same = torch.isclose(ours, theirs, rtol=1e-4, atol=1e-5).flatten(1).all(1)
    flipped = torch.isclose(ours, -theirs, rtol=1e-4, atol=1e-5).flatten(1).all(1)
    assert (same | flipped).all()
    mean_act = act.mean(1) - act.mean(dim=(1, 2, 3), keepdim=True)[:, 0]
    assert ((ours * mean_act).flatten(1).sum(1) > 0).all()


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
