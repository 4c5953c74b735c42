"""Krypton incremental occlusion: exact equality with plain occlusion on every supported family,
the fallbacks (logged, still exact), the approximate mode and the theoretical FLOP ratio."""

from __future__ import annotations

import logging
from collections import OrderedDict

import pytest
import torch
from skimage.metrics import structural_similarity
from torch import nn
from torch.nn import functional as F
from torchvision.models import resnet18, vgg11

from pipeline.errors import PipelineError
from pipeline.methods.execution import low_precision_supported
from pipeline.methods.occlusion import approximate, krypton
from pipeline.methods.occlusion.approximate import ApproximateEngine, drill_down, interpolation_fit
from pipeline.methods.occlusion.krypton import IncrementalEngine, theoretical_flop_ratio
from pipeline.methods.occlusion.regions import TAU_MIN_SIZE, cap_box, window_axis
from pipeline.methods.occlusion import PlainEngine, make_fill, occlusion, occlusion_boxes
from pipeline.models.digits import DigitsCNN, DigitsCNNFC
from pipeline.models.efficientnet_lite import build_efficientnet_lite0


class TinySequential(nn.Module):
    """Strided, dilated, 'same'-padded and asymmetric convs, ceil-mode max-pool, zero-pad module,
    avg-pool with padding, divisible adaptive pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, 8, 3, padding=1)),
            ("relu1", nn.ReLU(inplace=True)),
            ("conv2", nn.Conv2d(8, 8, 3, stride=2, padding=1)),
            ("bn", nn.BatchNorm2d(8)),
            ("relu2", nn.ReLU6()),
            ("pool1", nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)),
            ("pad", nn.ZeroPad2d((1, 0, 1, 0))),
            ("conv3", nn.Conv2d(8, 16, 3, dilation=2, padding="same")),
            ("pool2", nn.AvgPool2d(3, stride=1, padding=1)),
            ("conv4", nn.Conv2d(16, 16, (1, 3), padding=(0, 1))),
            ("gelu", nn.GELU()),
            ("pool3", nn.AdaptiveAvgPool2d(2)),
        ]))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.down is None else self.down(x)
        out += identity
        return torch.relu(out)


class TinyResidual(nn.Module):
    """Residual blocks with BatchNorm and a projection shortcut, plus a channel concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 5, 2, 2), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = BasicBlock(8, 8, 1)
        self.block2 = BasicBlock(8, 16, 2)
        self.branch_a = nn.Conv2d(16, 8, 1)
        self.branch_b = nn.Conv2d(16, 8, 3, padding=1)
        self.mix = nn.Conv2d(16, 16, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1).relu()
        x = self.mix(x) * 0.5 + x
        return self.fc(torch.flatten(self.pool(x), 1))


class TinyDepthwise(nn.Module):
    """MobileNet-style depthwise / pointwise convolutions with an inverted-residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.dw1 = nn.Conv2d(16, 16, 3, 2, 1, groups=16)
        self.pw1 = nn.Conv2d(16, 24, 1)
        self.act1 = nn.ReLU6()
        self.expand = nn.Conv2d(24, 48, 1)
        self.dw2 = nn.Conv2d(48, 48, 5, 1, 2, groups=48)
        self.act2 = nn.SiLU()
        self.project = nn.Conv2d(48, 24, 1)
        self.group = nn.Conv2d(24, 24, 3, padding=1, groups=4)
        self.act3 = nn.Hardswish()
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(24, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.pw1(self.dw1(self.stem(x))))
        x = x + self.project(self.act2(self.dw2(self.expand(x))))
        x = self.act3(self.group(x))
        return self.fc(self.pool(x).flatten(1))


class ReflectNet(nn.Module):
    """Reflection padding is not supported incrementally: the engine falls back from there."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.reflect = nn.ReflectionPad2d(1)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.reflect(torch.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


class ShiftedConv(nn.Conv2d):
    """A Conv2d subclass whose forward pads asymmetrically: its padding attribute is not what it
    does, so the engine must not treat it as a plain Conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (0, 2, 0, 2)), self.weight, self.bias)


class CustomLayers(nn.Module):
    """An overridden Conv2d forward and an upsampler (no parameters, not a padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.shifted = ShiftedConv(4, 4, 3)
        self.up = nn.Upsample(scale_factor=2)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.up(self.shifted(torch.relu(self.conv1(x)))))
        return self.fc(x.amax(dim=(2, 3)))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.sum() > 0:
            x = x * 2
        return self.fc(x.mean(dim=(2, 3)))


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics so BatchNorm is not the identity."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def _assert_exact(model: nn.Module, x: torch.Tensor, window: int, stride: int,
                  keep: slice | None = None, fill: str = "mean") -> IncrementalEngine:
    """Incremental logits equal plain ones to 1e-4 of their range, on (a subset of) positions."""
    model = _randomize_bn(model)
    boxes, _ = occlusion_boxes(x.shape[2], x.shape[3], window, stride)
    if keep is not None:
        boxes = boxes[keep]
    fill_image = make_fill(x, fill)
    engine = IncrementalEngine(model, x)
    assert engine.graph is not None
    with torch.no_grad():
        ref = PlainEngine(model, x)(boxes, fill_image)
    got = engine(boxes, fill_image)
    scale = float(ref.max() - ref.min())
    assert float((got - ref).abs().max()) <= 1e-4 * scale
    return engine


def test_tiny_sequential_is_exact() -> None:
    torch.manual_seed(0)
    # window 7 / stride 5 on 37 pixels: odd sizes and a clipped last window at every edge
    _assert_exact(TinySequential(), torch.randn(1, 3, 37, 37), 7, 5, fill="blur")


def test_digits_is_exact() -> None:
    torch.manual_seed(0)
    _assert_exact(DigitsCNN(), torch.randn(1, 1, 64, 64), 12, 8)
    _assert_exact(DigitsCNNFC(), torch.randn(1, 1, 64, 64), 12, 8, fill="constant")


def test_tiny_residual_is_exact() -> None:
    torch.manual_seed(0)
    _assert_exact(TinyResidual(), torch.randn(1, 3, 40, 40), 8, 4)


def test_tiny_depthwise_is_exact() -> None:
    torch.manual_seed(0)
    _assert_exact(TinyDepthwise(), torch.randn(1, 3, 48, 48), 10, 6)


def test_vgg11_is_exact() -> None:
    torch.manual_seed(0)
    model = vgg11(weights=None, num_classes=10)
    model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 10))  # the 100M-weight head is slow
    _assert_exact(model, torch.randn(1, 3, 64, 64), 16, 8, keep=slice(0, None, 4))


def test_resnet18_is_exact() -> None:
    torch.manual_seed(0)
    _assert_exact(resnet18(weights=None, num_classes=10), torch.randn(1, 3, 64, 64), 16, 8,
                  keep=slice(0, None, 3))


def test_efficientnet_lite0_is_exact() -> None:
    torch.manual_seed(0)
    model = build_efficientnet_lite0(num_classes=10)
    engine = _assert_exact(model, torch.randn(1, 3, 64, 64), 16, 8, keep=slice(0, None, 3))
    # the TF "same" pad modules are recognised by probing, not computed in full
    kinds = {n.name: r.kind for n, r in engine.rules.items()}
    assert kinds["stem_pad"] == "pad"
    assert kinds["blocks_1_depthwise_conv"] == "window"


def test_occlusion_switch_matches_plain() -> None:
    torch.manual_seed(0)
    model = _randomize_bn(TinyResidual())
    x = torch.randn(1, 3, 32, 32)
    plain = occlusion(model, x, 2, window=8, stride=4, batch_size=16)
    inc = occlusion(model, x, 2, window=8, stride=4, batch_size=16, engine="incremental")
    scale = float(plain.score_drop.max() - plain.score_drop.min())
    assert float((inc.score_drop - plain.score_drop).abs().max()) <= 1e-4 * scale
    torch.testing.assert_close(inc.prob_grid, plain.prob_grid, atol=1e-5, rtol=1e-4)


def test_unsupported_layer_falls_back_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="pipeline.methods.occlusion.krypton"):
        engine = _assert_exact(ReflectNet(), torch.randn(1, 3, 24, 24), 6, 3)
    assert "ReflectionPad2d" in caplog.text
    kinds = {n.name: r.kind for n, r in engine.rules.items()}
    assert kinds["conv1"] == "window" and kinds["reflect"] == "dense"


def test_overridden_forward_and_upsampling_fall_back(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="pipeline.methods.occlusion.krypton"):
        engine = _assert_exact(CustomLayers(), torch.randn(1, 3, 20, 20), 5, 3)
    assert "ShiftedConv overrides Conv2d.forward" in caplog.text
    kinds = {n.name: r.kind for n, r in engine.rules.items()}
    assert kinds["conv1"] == "window" and kinds["shifted"] == "dense" and kinds["up"] == "dense"


def test_untraceable_model_uses_plain(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = Untraceable().eval()
    x = torch.randn(1, 3, 16, 16)
    with caplog.at_level(logging.INFO, logger="pipeline.methods.occlusion.krypton"):
        engine = IncrementalEngine(model, x)
    assert engine.graph is None and "cannot trace" in caplog.text
    boxes, _ = occlusion_boxes(16, 16, 4, 4)
    fill = make_fill(x)
    with torch.no_grad():
        torch.testing.assert_close(engine(boxes, fill), PlainEngine(model, x)(boxes, fill))


@pytest.mark.parametrize(("kernel", "stride", "pad", "dilation"),
                         [(3, 1, 1, 1), (3, 2, 1, 1), (7, 2, 3, 1), (3, 1, 2, 2), (1, 2, 0, 1),
                          (5, 3, 0, 1)])
def test_window_axis_matches_brute_force(kernel: int, stride: int, pad: int, dilation: int) -> None:
    """The changed output range of a 1-D sliding window is the outputs that really change."""
    n = 23
    weight = torch.ones(1, 1, kernel)
    base = F.conv1d(torch.zeros(1, 1, n), weight, stride=stride, padding=pad, dilation=dilation)
    out_size = base.shape[-1]
    for lo in range(n):
        for hi in range(lo + 1, min(n, lo + 6) + 1):
            x = torch.zeros(1, 1, n)
            x[..., lo:hi] = 1.0
            out = F.conv1d(x, weight, stride=stride, padding=pad, dilation=dilation)[0, 0]
            changed = (out != 0).nonzero().flatten().tolist()
            got_lo, got_hi = window_axis(torch.tensor([lo]), torch.tensor([hi]), pad, kernel,
                                          stride, dilation, out_size, None)
            if not changed:
                assert int(got_hi) == int(got_lo)
            elif dilation == 1:
                assert (int(got_lo), int(got_hi)) == (changed[0], changed[-1] + 1)
            else:  # dilated taps can skip a small change: the range may only be wider
                assert int(got_lo) <= changed[0] and changed[-1] < int(got_hi)


def test_theoretical_flop_ratio_single_conv() -> None:
    """One 3x3 conv on 8x8, window 2 stride 2: changed output sides are 3, 4, 4, 3 -> 3.5^2."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    ratio = theoretical_flop_ratio(model.eval(), (1, 8, 8), 2, 2)
    assert ratio == pytest.approx(64 / 3.5 ** 2)
    thresholded = theoretical_flop_ratio(model.eval(), (1, 8, 8), 2, 2, tau=0.25)
    assert thresholded == pytest.approx(64 / 2 ** 2)


def test_approximate_without_approximation_is_exact() -> None:
    torch.manual_seed(0)
    model = _randomize_bn(TinyResidual())
    x = torch.randn(1, 3, 32, 32)
    exact = occlusion(model, x, 1, window=8, stride=4, engine="incremental")
    same = occlusion(model, x, 1, window=8, stride=4, engine="approximate", tolerance=None,
                     tau=None, low_precision=False)
    torch.testing.assert_close(same.score_drop, exact.score_drop, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make", [TinySequential, TinyResidual, TinyDepthwise])
@pytest.mark.parametrize("tau", [None, 0.3])
def test_precomputed_boxes_give_the_same_logits(make: type[nn.Module], tau: float | None) -> None:
    """Boxes worked out once for every position (``precompute``) and indexed per batch give the same
    logits as boxes worked out per batch; boxes outside the table are still worked out."""
    torch.manual_seed(0)
    model = _randomize_bn(make())
    x = torch.randn(1, 3, 32, 32)
    boxes, _ = occlusion_boxes(32, 32, 8, 4)
    fill = make_fill(x, "mean")
    subset = boxes[torch.randperm(len(boxes), generator=torch.Generator().manual_seed(1))[:20]]
    computed = IncrementalEngine(model, x, tau)(subset, fill)
    engine = IncrementalEngine(model, x, tau)
    engine.precompute(boxes)
    assert engine.precomputed(subset)
    torch.testing.assert_close(engine(subset, fill), computed, rtol=0, atol=0)
    other = torch.tensor([[1, 2, 9, 10]])
    assert not engine.precomputed(other)
    torch.testing.assert_close(engine(other, fill), IncrementalEngine(model, x, tau)(other, fill),
                               rtol=0, atol=0)


def _smooth_detector() -> nn.Module:
    """DigitsCNN with non-negative averaging convs and a class-4 readout of the pooled features:
    its occlusion map follows the image's bright blobs, a map with structure to compare."""
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.abs_()
                m.weight /= m.weight[0].sum()
                m.bias.zero_()
        model.fc.weight.normal_(0, 0.1)
        model.fc.weight[4] = 10.0 / 128
        model.fc.bias.zero_()
    return model


def _blobs() -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    return (3.0 * torch.exp(-((yy - 30) ** 2 + (xx - 36) ** 2) / 150.0)
            + 0.5 * torch.exp(-((yy - 10) ** 2 + (xx - 12) ** 2) / 50.0))[None, None]


def _ssim(exact: torch.Tensor, approx: torch.Tensor) -> float:
    e, a = exact.double().numpy(), approx.double().numpy()
    return float(structural_similarity(e, a, data_range=float(e.max() - e.min())))


def test_approximate_is_close_and_cheaper() -> None:
    model, x = _smooth_detector(), _blobs()
    exact = occlusion(model, x, 4, window=8, stride=2, engine="incremental")
    engine = ApproximateEngine(model, x)
    approx = occlusion(model, x, 4, window=8, stride=2, engine=engine)
    assert _ssim(exact.prob, approx.prob) >= 0.9
    assert _ssim(exact.score_drop, approx.score_drop) >= 0.9
    assert not torch.allclose(exact.score_drop, approx.score_drop)
    # a smooth map: interpolation fits it, so little beyond the checkerboard (421 of 841) is run
    assert len(engine.evaluated) < 0.55 * len(exact.boxes)


def test_approximate_quality_on_a_rough_map(monkeypatch: pytest.MonkeyPatch) -> None:
    """A random network's map varies from position to position: the checkerboard alone misses
    the bar, and so does the threshold a smooth map would get (fit 1); the threshold scaled by
    the measured fit brings the heat map's SSIM to 0.9 or more."""
    torch.manual_seed(2)
    model = DigitsCNN().eval()
    x = torch.randn(1, 1, 64, 64)
    target = int(model(x).argmax())
    exact = occlusion(model, x, target, window=8, stride=4, engine="incremental")
    engine = ApproximateEngine(model, x)
    approx = occlusion(model, x, target, window=8, stride=4, engine=engine)
    assert _ssim(exact.prob, approx.prob) >= 0.9
    assert len(engine.evaluated) < 0.9 * len(exact.boxes)
    coarse = occlusion(model, x, target, window=8, stride=4, engine="approximate",
                       tolerance=float("inf"))
    assert _ssim(exact.prob, coarse.prob) < 0.9
    monkeypatch.setattr(approximate, "interpolation_fit", lambda prob, known: 1.0)
    unscaled = ApproximateEngine(model, x)
    blind = occlusion(model, x, target, window=8, stride=4, engine=unscaled)
    assert len(unscaled.evaluated) < len(engine.evaluated)
    assert _ssim(exact.prob, blind.prob) < 0.9


def test_interpolation_fit_tells_smooth_from_rough() -> None:
    rows, cols = torch.meshgrid(torch.arange(15.0), torch.arange(15.0), indexing="ij")
    known = (rows + cols) % 2 == 0
    smooth = torch.exp(-((rows - 6) ** 2 + (cols - 8) ** 2) / 30.0)
    rough = torch.rand(15, 15, generator=torch.Generator().manual_seed(0))
    assert interpolation_fit(smooth, known) > 0.9
    assert interpolation_fit(rough, known) < 0.2
    assert interpolation_fit(torch.ones(15, 15), known) == 0.0
    # the fit is measured on the known cells only: the others may hold anything
    assert interpolation_fit(torch.where(known, smooth, rough), known) == pytest.approx(
        interpolation_fit(smooth, known))


def test_projective_field_threshold_is_close_and_cheaper() -> None:
    model, x = _smooth_detector(), _blobs()
    exact = occlusion(model, x, 4, window=8, stride=4, engine="incremental")
    engine = ApproximateEngine(model, x, tau=0.2, tolerance=None, low_precision=False)
    approx = occlusion(model, x, 4, window=8, stride=4, engine=engine)
    assert _ssim(exact.prob, approx.prob) >= 0.9
    assert not torch.allclose(exact.score_drop, approx.score_drop)
    boxes = exact.boxes
    assert engine.flop_ratio(boxes) > 1.5 * IncrementalEngine(model, x).flop_ratio(boxes)


def test_threshold_centres_on_the_patch_and_spares_small_maps() -> None:
    lo, hi = torch.tensor([0, 4]), torch.tensor([20, 9])
    centre = torch.tensor([0.05, 0.5])
    # a box clipped at the image's edge keeps the edge, where the patch is; a box within the
    # limit is left alone
    y0, y1 = cap_box(lo, hi, 20, 0.3, centre)
    assert y0.tolist() == [0, 4] and y1.tolist() == [6, 9]
    y0, y1 = cap_box(lo, hi, 20, 0.3)
    assert y0.tolist() == [7, 4] and y1.tolist() == [13, 9]
    y0, y1 = cap_box(torch.tensor([0]), torch.tensor([20]), 20, 0.3, torch.tensor([0.5]))
    assert (y0.item(), y1.item()) == (7, 13)
    small = TAU_MIN_SIZE - 1
    y0, y1 = cap_box(torch.tensor([0]), torch.tensor([small]), small, 0.3,
                          torch.tensor([0.5]))
    assert (y0.item(), y1.item()) == (0, small)


def test_drill_down_refines_where_the_map_changes() -> None:
    """A 5x5 grid: the checkerboard (13 positions) is evaluated first; a dip at the centre makes
    its four neighbours' neighbourhoods vary, so exactly those four are evaluated too, and the
    flat rest is the mean of its neighbours."""
    truth = torch.zeros(25, 2)
    truth[12, 0] = -5.0
    calls: list[int] = []

    def evaluate(index: torch.Tensor) -> torch.Tensor:
        calls.append(len(index))
        return truth[index]

    logits, evaluated = drill_down(evaluate, (5, 5), 0, tolerance=0.3)
    checkerboard = [i for i in range(25) if (i // 5 + i % 5) % 2 == 0]
    assert calls == [13, 4]
    assert evaluated.tolist() == sorted(checkerboard + [7, 11, 13, 17])
    torch.testing.assert_close(logits[evaluated], truth[evaluated])
    torch.testing.assert_close(logits[1], torch.zeros(2))
    # a map that varies everywhere by more than the tolerance is evaluated everywhere
    rough = torch.randn(25, 3, generator=torch.Generator().manual_seed(0)) * 3
    _, every = drill_down(lambda i: rough[i], (5, 5), 1, tolerance=0.0)
    assert every.tolist() == list(range(25))


def test_drill_down_estimate_is_the_neighbour_mean() -> None:
    truth = torch.arange(9.0).reshape(9, 1).repeat(1, 2)
    logits, evaluated = drill_down(lambda i: truth[i], (3, 3), 0, tolerance=1.0)
    assert evaluated.tolist() == [0, 2, 4, 6, 8]
    # position 1 (row 0, col 1): neighbours 0, 2 and 4; position 3: neighbours 0, 4 and 6
    assert float(logits[1, 0]) == pytest.approx((0 + 2 + 4) / 3)
    assert float(logits[3, 0]) == pytest.approx((0 + 4 + 6) / 3)


@pytest.mark.skipif(not low_precision_supported(), reason="no native bfloat16 on this CPU")
@pytest.mark.parametrize("make", [TinySequential, TinyResidual, TinyDepthwise])
def test_low_precision_change_is_close(make: type[nn.Module],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Convolving only the change in bfloat16 stays within 2% of the score range of exact
    occlusion (and is not bit-exact: the bfloat16 path ran), on every layer kind."""
    monkeypatch.setattr(krypton, "LOW_PRECISION_MIN_MACS", 0)
    torch.manual_seed(0)
    model = _randomize_bn(make())
    x = torch.randn(1, 3, 32, 32)
    boxes, _ = occlusion_boxes(32, 32, 8, 4)
    fill = make_fill(x, "mean")
    exact = IncrementalEngine(model, x)(boxes, fill)
    engine = ApproximateEngine(model, x, tolerance=None, tau=None)
    assert engine.low_precision
    approx = engine(boxes, fill)
    error = float((approx - exact).abs().max()) / float(exact.max() - exact.min())
    assert 0 < error <= 2e-2


def test_low_precision_can_be_off() -> None:
    model = DigitsCNN().eval()
    engine = ApproximateEngine(model, torch.randn(1, 1, 64, 64), low_precision=False)
    assert not engine.low_precision


def test_bad_approximation_parameters() -> None:
    model = DigitsCNN().eval()
    x = torch.randn(1, 1, 64, 64)
    with pytest.raises(PipelineError, match="tau"):
        IncrementalEngine(model, x, tau=1.5)
    with pytest.raises(PipelineError, match="tolerance"):
        ApproximateEngine(model, x, tolerance=-0.1)
