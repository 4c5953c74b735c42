"""How the methods run a model: the channels_last copy (same numbers, the user's model untouched,
a model that rejects the layout run as it is from then on), and the gradient methods and the shared
pass on that copy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.methods.base import PassNeeds, shared_pass
from pipeline.methods.execution import (CPU_PASS_PIXELS, PASS_MAX_IMAGES, FastLayout, channels_last_copy,
                                        kept_bytes, pass_size)
from pipeline.methods.hooks import truncated_forward
from pipeline.methods.registry import make_method
from pipeline.models.digits import DigitsCNN


def test_fast_layout_with_weights_runs_a_channels_last_copy() -> None:
    """A one-channel input's layout is ambiguous: only weights in channels_last keep the network in
    it. The copy gives the model's own maps, the model is left as it was, and a model that rejects
    the layout runs as it is from then on."""
    torch.manual_seed(0)
    model = DigitsCNN(width=8).eval()
    x = torch.randn(3, 1, 16, 16)
    fast = FastLayout(model, torch.device("cpu"), weights=True)
    assert fast.model is not model and channels_last_copy(model) is fast.model
    with torch.no_grad():
        got = fast.apply(lambda m, b: truncated_forward(m, b, ["features.pool1", "features.relu4"]), x)
        want = truncated_forward(model, x, ["features.pool1", "features.relu4"])
    for layer in want:
        assert got[layer].is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-6)
    assert model.features.conv2.weight.is_contiguous() and not fast.model.features.conv2.weight.is_contiguous()
    with torch.no_grad():
        model.features.conv1.bias.add_(1.0)  # new weights: a new copy
    assert channels_last_copy(model) is not fast.model

    class Viewing(nn.Module):  # .view of a feature map: fails in channels_last
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).view(x.shape[0], -1)

    viewing = Viewing().eval()
    fast = FastLayout(viewing, torch.device("cpu"), weights=True)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), viewing(x))
    assert fast.model is viewing and fast.memory_format is torch.contiguous_format
    again = FastLayout(viewing, torch.device("cpu"), weights=True)  # remembered: no second try
    assert again.model is viewing and again.memory_format is torch.contiguous_format


@pytest.mark.parametrize("name", ["saliency", "input_x_gradient", "guided_backprop", "gradcam", "guided_gradcam"])
def test_gradient_methods_run_on_the_channels_last_copy(name: str) -> None:
    """The forward goes through the channels_last copy (a hook on the user's conv is copied with it
    and sees that layout), the map is the plain model's own gradient, the user's model keeps its
    layout and hooks, and what comes back is in the default layout."""
    torch.manual_seed(0)
    model = DigitsCNN(width=8).eval()
    x, target = torch.randn(3, 1, 16, 16), torch.tensor([0, 3, 5])
    layouts: list[bool] = []
    handle = model.features.conv1.register_forward_hook(
        lambda _m, inp, _o: layouts.append(inp[0].is_contiguous(memory_format=torch.channels_last)))
    method = make_method(name).prepare(model, x[:1])
    layouts.clear()
    got = method.attribute(model, x, target)
    handle.remove()
    assert layouts and all(layouts)
    assert model.features.conv2.weight.is_contiguous()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert got.maps.is_contiguous() and all(v.is_contiguous() for v in got.extras.values())
    if name == "saliency":
        xg = x.clone().requires_grad_(True)
        model(xg).gather(1, target[:, None]).sum().backward()
        torch.testing.assert_close(got.extras["grad"], xg.grad, rtol=1e-5, atol=1e-6 * float(xg.grad.abs().max()))
        shared = shared_pass(model, x, target, PassNeeds(input_grad=True))
        assert torch.equal(shared.input_grad, got.extras["grad"])  # the same model, the same numbers
        assert shared.input_grad.is_contiguous() and shared.x.is_contiguous()


def test_kept_bytes_counts_what_a_pass_keeps_for_its_backward_without_the_weights() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(5, 1, 8, 8)
    # the conv keeps its input (1x8x8 floats), the ReLU its output (4x8x8); the weight is not counted
    assert kept_bytes(model, x) == (1 + 4) * 8 * 8 * 4
    assert kept_bytes(model, x[:2]) == kept_bytes(model, x)  # per image, whatever the batch
    assert kept_bytes(torch.jit.script(model), x) == 0       # not visible in TorchScript
    bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).train()
    assert kept_bytes(bn, x) == 0 and bn[1].num_batches_tracked == 0  # no forward that moves its statistics


def test_pass_size_takes_more_images_for_big_weights_and_small_activations() -> None:
    x = torch.randn(500, 1, 64, 64)
    by_pixels = CPU_PASS_PIXELS // (64 * 64)
    small = DigitsCNN().eval()               # tiny weights: the pixel rule
    assert pass_size(small, x) == by_pixels
    assert pass_size(small, x[:7]) == 7      # never more than the batch
    wide = nn.Sequential(nn.Conv2d(1, 2, 3, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 16 * 16, 4096)).eval()
    assert pass_size(wide, x) == PASS_MAX_IMAGES > by_pixels  # 16 MB of weights, little kept an image
    big = torch.randn(4, 1, 2048, 2048)      # more pixels than one pass should hold: one image a pass
    assert pass_size(small, big) == 1
