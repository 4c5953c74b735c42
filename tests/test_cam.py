"""CAM, Grad-CAM, the GAP-head finder, CAM boxes and the localizer conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import LayerAttribution, LayerGradCam
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from pipeline.errors import PipelineError
from pipeline.methods.cam import (GapHead, GapLocalizer, cam, cam_box, find_gap_head,
                                  fit_gap_head, last_feature_map, pooled_features)
from pipeline.methods.gradcam import gradcam
from pipeline.methods.hooks import capture, check_target, forward_until, get_layer


def images(n: int, channels: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, channels, 64, 64, generator=torch.Generator().manual_seed(seed))


CASES = [("digits", "features.relu4", 1), ("resnet", "layer4", 3)]


@pytest.mark.parametrize("which,layer,channels", CASES)
def test_gradcam_matches_captum(which: str, layer: str, channels: int,
                                request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(which)
    x, targets = images(3, channels), [1, 4, 6]
    ours = gradcam(model, x, targets, layer)
    low = LayerGradCam(model, get_layer(model, layer)).attribute(
        x, target=targets, relu_attributions=True)
    theirs = LayerAttribution.interpolate(low, (64, 64), "bilinear")[:, 0].detach()
    assert ours.shape == (3, 64, 64) and theirs.abs().max() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


@pytest.mark.parametrize("which,layer,channels", CASES)
def test_gradcam_matches_pytorch_grad_cam(which: str, layer: str, channels: int,
                                          request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(which)
    x, targets = images(2, channels, seed=3), [1, 4]  # classes whose map is not all zero
    ours = gradcam(model, x, targets, layer)
    with GradCAM(model, [get_layer(model, layer)]) as method:
        scaled = method(x, [ClassifierOutputTarget(t) for t in targets])
        # Its un-normalised map at the layer's resolution, from the activations it recorded:
        recorded = method.activations_and_grads
        acts, grads = recorded.activations[0].numpy(), recorded.gradients[0].numpy()
        raw = method.get_cam_image(x, get_layer(model, layer), None, acts, grads)
    low = torch.relu(torch.from_numpy(np.asarray(raw)))
    up = nn.functional.interpolate(low[:, None], size=(64, 64), mode="bilinear",
                                   align_corners=False)[:, 0]
    torch.testing.assert_close(ours, up, rtol=1e-4, atol=1e-4 * float(up.abs().max()))
    # Its output is our map min-max scaled per image (then resized by OpenCV).
    flat = ours.flatten(1)
    lo, hi = flat.min(1).values.view(-1, 1, 1), flat.max(1).values.view(-1, 1, 1)
    torch.testing.assert_close((ours - lo) / (hi - lo), torch.from_numpy(scaled),
                               rtol=0, atol=1e-4)


class SameSizeGap(nn.Module):
    """conv (same resolution) -> ReLU -> GAP -> Linear, so maps need no upsampling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


def test_cam_equals_gradcam_times_positions_on_a_gap_network() -> None:
    torch.manual_seed(0)
    model = SameSizeGap().eval()
    x = torch.randn(3, 3, 12, 10)
    assert find_gap_head(model, x[:1]) == GapHead("act", "fc")
    c, g = cam(model, x, [0, 1, 3]), gradcam(model, x, [0, 1, 3], "act")
    assert (c < 0).any() and g.abs().max() > 0
    torch.testing.assert_close(torch.relu(c), g * 12 * 10, rtol=1e-5, atol=1e-6)


class HandModel(nn.Module):
    """x -> [relu(x), relu(-x)] -> spatial mean (functional) -> Linear, all weights fixed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.act = nn.ReLU()
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.fc.weight.copy_(torch.tensor([[2.0, 0.5], [-1.0, 3.0]]))
            self.fc.bias.fill_(7.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))


def test_cam_hand_computed() -> None:
    model = HandModel().eval()
    x = torch.tensor([[1.0, -1.0], [2.0, 0.0]]).view(1, 1, 2, 2)
    assert find_gap_head(model, x) == GapHead("act", "fc")
    # A0 = relu(x) = [[1,0],[2,0]], A1 = relu(-x) = [[0,1],[0,0]]; the bias is not part of CAM.
    torch.testing.assert_close(cam(model, x, 0)[0], torch.tensor([[2.0, 0.5], [4.0, 0.0]]))
    torch.testing.assert_close(cam(model, x, 1)[0], torch.tensor([[-1.0, 3.0], [-2.0, 0.0]]))


def test_find_gap_head_on_real_networks(digits: nn.Module, resnet: nn.Module) -> None:
    assert find_gap_head(digits, images(1, 1)) == GapHead("features.relu4", "fc")
    # In a ResNet block, bn2's output is changed in place by '+=' and the shared in-place ReLU
    # runs twice, so the innermost honest owner of the pooled maps is the block itself.
    assert find_gap_head(resnet, images(1, 3)) == GapHead("layer4.1", "fc")
    assert last_feature_map(resnet, images(1, 3)) == "layer4.1"
    c = cam(resnet, images(2, 3), [0, 6])
    assert c.shape == (2, 64, 64)
    torch.testing.assert_close(cam(resnet, images(2, 3), [0, 6], GapHead("layer4", "fc")), c)


def test_cam_needs_a_gap_head(digits_fc: nn.Module, digits: nn.Module) -> None:
    with pytest.raises(PipelineError, match="no global-average-pooling.*features.relu4.*"
                                            "GapLocalizer"):
        cam(digits_fc, images(1, 1), 0)
    with pytest.raises(PipelineError, match="4-D output"):
        cam(digits, images(1, 1), 0, GapHead("flatten", "fc"))
    with pytest.raises(PipelineError, match="channels"):
        cam(digits, images(1, 1), 0, GapHead("features.relu3", "fc"))
    with pytest.raises(PipelineError, match="Linear"):
        cam(digits, images(1, 1), 0, GapHead("features.relu4", "features.conv4"))
    with pytest.raises(PipelineError, match="out of range"):
        cam(digits, images(1, 1), 10)


def test_gradcam_errors(digits: nn.Module, resnet: nn.Module) -> None:
    x = images(2, 1)
    with pytest.raises(PipelineError, match="4-D output.*shape \\(2, 10\\).*features.conv4"):
        gradcam(digits, x, 0, "fc")
    with pytest.raises(PipelineError, match="Unknown layer 'features.conv9'.*Did you mean:.*"
                                            "features.conv"):
        gradcam(digits, x, 0, "features.conv9")
    with pytest.raises(PipelineError, match="out of range"):
        gradcam(digits, x, [3, 11], "features.relu4")
    with pytest.raises(PipelineError, match="in place"):
        gradcam(resnet, images(1, 3), 0, "layer4.1.bn2")


def test_hook_helpers_remove_their_hooks(digits: nn.Module) -> None:
    layer = get_layer(digits, "features.conv2")
    x = images(2, 1)
    with capture(digits, "features.conv2") as cap:
        digits(x)
    assert cap.output.shape == (2, 32, 32, 32) and cap.calls == 1
    out = forward_until(digits, "features.conv2", x)
    torch.testing.assert_close(out, cap.output)
    with pytest.raises(RuntimeError, match="boom"), capture(digits, "features.conv2"):
        raise RuntimeError("boom")
    assert not layer._forward_hooks
    with pytest.raises(PipelineError, match="not called"), capture(digits, "features.conv2") as c2:
        c2.output  # noqa: B018 - reading it is the check
    assert check_target(3, 10, batch=4).tolist() == [3, 3, 3, 3]
    with pytest.raises(PipelineError, match="integers"):
        check_target(1.5, 10)


def test_cam_box_of_a_synthetic_blob() -> None:
    m = torch.full((40, 50), 0.05)
    m[10:20, 5:25] = 1.0          # the largest region above 0.2 * max
    m[30:33, 40:44] = 0.9         # a smaller separate region
    m[20, 25] = 0.5               # touches the big region diagonally: 8-connected, joins it
    assert cam_box(m).tolist() == [5, 10, 26, 21]
    batch = torch.stack([m, torch.zeros(40, 50)])
    assert cam_box(batch).tolist() == [[5, 10, 26, 21], [0, 0, 50, 40]]
    assert cam_box(m, fraction=0.95).tolist() == [5, 10, 25, 20]
    with pytest.raises(PipelineError, match="fraction"):
        cam_box(m, fraction=2.0)


def test_fit_gap_head_learns_a_separable_problem() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0, 0, 1], [0, 5.0, 0, 1], [0, 0, 5.0, 1]]) * 10
    labels = torch.arange(3).repeat(40)
    feats = centres[labels] + torch.randn(120, 4, generator=gen)
    feats[:, 3] = 7.0  # a constant channel must not break the standardisation
    head = fit_gap_head(feats, labels, 3, epochs=50)
    assert isinstance(head, nn.Linear) and head.weight.shape == (3, 4)
    assert (head(feats).argmax(1) == labels).all()
    again = fit_gap_head(feats, labels, 3, epochs=50)
    torch.testing.assert_close(again.weight, head.weight, rtol=0, atol=0)
    with pytest.raises(PipelineError, match="out of range"):
        fit_gap_head(feats, labels + 1, 3)
    with pytest.raises(PipelineError, match="features \\(N,C\\)"):
        fit_gap_head(feats, labels[:5], 3)


def test_localizer_conversion_runs_cam(digits_fc: nn.Module) -> None:
    x = images(6, 1, seed=7)
    assert last_feature_map(digits_fc, x[:1]) == "features.relu4"
    feats = pooled_features(digits_fc, "features.relu4", x, batch_size=4)
    with torch.no_grad():
        expected = digits_fc.features(x).mean(dim=(2, 3))
    torch.testing.assert_close(feats, expected)
    fc = fit_gap_head(feats, torch.tensor([0, 1, 2, 0, 1, 2]), 10, epochs=20)
    localizer = GapLocalizer(digits_fc, "features.relu4", fc).eval()
    with torch.no_grad():
        torch.testing.assert_close(localizer(x), fc(feats))
    assert find_gap_head(localizer, x[:1]).fc == "fc"
    maps = cam(localizer, x, 2, localizer.head)
    torch.testing.assert_close(maps, cam(localizer, x, 2))
    low = torch.einsum("c,bchw->bhw", fc.weight[2].detach(), digits_fc.features(x).detach())
    up = nn.functional.interpolate(low[:, None], size=(64, 64), mode="bilinear",
                                   align_corners=False)[:, 0]
    torch.testing.assert_close(maps, up)
    assert gradcam(localizer, x, 2, "trunk").shape == (6, 64, 64)
    with pytest.raises(PipelineError, match="Unknown layer"):
        GapLocalizer(digits_fc, "features.relu5", fc)
    with pytest.raises(PipelineError, match="no layer with a spatial"):
        last_feature_map(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), torch.randn(1, 1, 2, 2))
