"""Score-CAM and Ablation-CAM against pytorch-grad-cam (its maps are ours min-max scaled; compared
at layers with the input's resolution, where its cv2 resize is the identity), and RISE on a model
whose answer is known, all on tiny hand-built models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pytorch_grad_cam import AblationCAM as RefAblationCAM
from pytorch_grad_cam import ScoreCAM as RefScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from pipeline.errors import PipelineError
from pipeline.methods.execution import fold_batchnorm, low_precision_active
from pipeline.methods.masking import RISE, AblationCAM, RiseMasks, ScoreCAM, rise_masks
from pipeline.methods.registry import METHODS
from tests.helpers import TinyResNet as Net
from tests.helpers import trained_like

TARGETS = [0, 3, 4]


class DenseNet(nn.Module):
    """The stem's output concatenated to the layer's (batch sizes must agree), then flattened with
    ``view`` (which rejects channels_last tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(12 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        both = nn.functional.avg_pool2d(torch.cat([s, self.mid(s)], dim=1), 2)
        return self.fc(both.view(both.shape[0], -1))


def _seeded(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model = model()
    trained_like(model)
    with torch.no_grad():  # a dead stem channel (constant zero): Score-CAM's shared zero-image pass
        model.stem[0].bias[1] = -100.0
    return model.eval()


@pytest.fixture(scope="module")
def net() -> Net:
    return _seeded(Net)


@pytest.fixture(scope="module")
def dense() -> DenseNet:
    return _seeded(DenseNet)


def _minmax(maps: torch.Tensor) -> np.ndarray:
    flat = maps.flatten(1)
    lo, hi = flat.amin(1)[:, None, None], flat.amax(1)[:, None, None]
    return ((maps - lo) / (hi - lo + 1e-7)).numpy()


def _batch_sizes(module: nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    sizes: list[int] = []
    return sizes, module.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))


@pytest.mark.parametrize(("ours", "ref"), [(ScoreCAM, RefScoreCAM), (AblationCAM, RefAblationCAM)],
                         ids=["scorecam", "ablationcam"])
@pytest.mark.parametrize(("model", "layer"), [("net", "stem"), ("net", "block"), ("dense", "mid")])
def test_matches_pytorch_grad_cam(request: pytest.FixtureRequest, ours, ref, model: str, layer: str) -> None:
    model = request.getfixturevalue(model)
    torch.manual_seed(1)
    x = torch.randn(3, 3, 16, 16)
    with ref(model=model, target_layers=[model.get_submodule(layer)]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in TARGETS])
    maps = ours(layer=layer).attribute(model, x, torch.tensor(TARGETS)).maps
    assert maps.shape == (3, 16, 16) and (maps >= 0).all()
    np.testing.assert_allclose(_minmax(maps), theirs, rtol=1e-4, atol=1e-5)


def test_scorecam_scores_all_zero_masks_in_one_pass() -> None:
    net = _seeded(Net)  # fresh: its folded copy is made (and checked) on the first call only
    x = torch.randn(2, 3, 16, 16)
    sizes, handle = _batch_sizes(net.stem[0])  # a conv without BatchNorm: kept in the folded copy
    ScoreCAM(layer="stem", batch_size=5).attribute(net, x, 1)
    first = list(sizes)
    sizes.clear()
    ScoreCAM(layer="stem", batch_size=5).attribute(net, x, 1)
    handle.remove()
    # the capture pass, the folding check (model and copy), 2 x 7 live channels in batches of 5,
    # one zero image for the dead channel; the second call reuses the folded copy
    assert first == [2, 1, 1, 5, 5, 4, 1]
    assert sizes == [2, 5, 5, 4, 1]


def test_fold_batchnorm_keeps_the_logits_or_the_model(net: Net) -> None:
    x = torch.randn(2, 3, 16, 16)
    folded = fold_batchnorm(net, x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-6)
    training = _seeded(Net).train()
    assert fold_batchnorm(training, x) is training

    class Branchy(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # control flow on values: fx cannot trace it
            return super().forward(x) if x.sum() > 0 else -super().forward(x)

    branchy = _seeded(Branchy)
    assert fold_batchnorm(branchy, x) is branchy
    # made once per model, remade when its weights change in place
    assert fold_batchnorm(net, x) is folded
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        bn.running_mean.add_(1.0)
    refolded = fold_batchnorm(net, x)
    assert refolded is not folded
    with torch.no_grad():
        torch.testing.assert_close(refolded(x), net(x), rtol=1e-5, atol=1e-6)
        bn.running_mean.sub_(1.0)


def test_ablationcam_runs_the_trunk_once_per_batch_and_falls_back(net: Net, dense: DenseNet) -> None:
    x = torch.randn(2, 3, 16, 16)
    sizes, handle = _batch_sizes(net.stem)
    AblationCAM(layer="block", batch_size=4).attribute(net, x, 1)
    handle.remove()
    assert sizes == [2] + [1] * 6  # 9 copies (unablated + 8 channels) per image in batches of 4
    dense = copy.deepcopy(dense)  # a model not seen yet: its first pass tries channels_last
    sizes, handle = _batch_sizes(dense.stem)
    AblationCAM(layer="mid", batch_size=4).attribute(dense, x, 1)
    handle.remove()
    # the cat fails on one image (in both layouts), so full copies of 7 (the first in channels_last,
    # which the view rejects)
    assert sizes == [2, 1, 1, 4, 4, 3, 4, 3]
    sizes, handle = _batch_sizes(dense.stem)
    AblationCAM(layer="mid", batch_size=4).attribute(dense, x, 1)
    handle.remove()
    assert sizes == [2, 1, 4, 3, 4, 3]  # the rejection is remembered: no second try in channels_last


@pytest.mark.parametrize("cls", [ScoreCAM, AblationCAM, RISE], ids=["scorecam", "ablationcam", "rise"])
def test_batched_equals_one_by_one_and_batch_size_does_not_matter(net: Net, cls) -> None:
    torch.manual_seed(2)
    x = torch.randn(3, 3, 16, 16)
    settings = {"masks": 50} if cls is RISE else {}
    method = cls(**settings).prepare(net, x[:1])
    if cls is not RISE:
        assert method.settings["layer"] == "block2"  # the layer the GAP head reads
    batched = method(net, x, torch.tensor([0, 1, 2]))
    single = torch.cat([method(net, x[i:i + 1], i) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-6)
    small = cls(batch_size=3, **settings).prepare(net, x[:1])(net, x, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(small, batched, rtol=1e-4, atol=1e-6)
    assert all(not m._forward_hooks for m in net.modules())


class RegionScore(nn.Module):
    """Class 0's logit is 4 x (the mean of the image over rows 4..7, columns 10..13 - 0.5), class
    1's is 0: class 0's probability grows with how much of that region a mask keeps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = 4 * (x[:, :, 4:8, 10:14].mean(dim=(1, 2, 3)) - 0.5)
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def test_rise_finds_the_region_the_score_reads() -> None:
    x = torch.ones(1, 3, 16, 16)
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[4:8, 10:14] = True
    maps = RISE(masks=500, cells=4, seed=3)(RegionScore(), x, torch.tensor([0]))[0]
    assert inside.flatten()[maps.flatten().argmax()]
    assert maps[inside].mean() > maps[~inside].mean() + 0.1
    assert maps[inside].min() > maps[10:, :6].max()  # far from the region: only the average
    other = RISE(masks=500, cells=4, seed=3)(RegionScore(), x, 1)[0]
    assert inside.flatten()[other.flatten().argmin()]  # class 1 loses where the region shows
    torch.testing.assert_close(maps + other, torch.ones(16, 16), atol=0.2, rtol=0)


def test_rise_masks_are_seeded_and_match_the_authors_resize() -> None:
    transform = pytest.importorskip("skimage.transform")
    masks = RiseMasks.draw(40, 5, 0.5, 7, (18, 23))
    m = masks.chunk(0, 40)
    torch.testing.assert_close(rise_masks(40, 5, 0.5, 7, (18, 23)), m)
    torch.testing.assert_close(masks.chunk(10, 20), m[10:20])
    assert not torch.equal(rise_masks(40, 5, 0.5, 8, (18, 23)), m)
    assert m.min() >= 0 and m.max() <= 1
    up = (6 * 4, 6 * 5)  # (cells + 1) x ceil(size / cells)
    for i in range(40):  # the authors' code: skimage resize (linear, reflect) and a random crop
        big = transform.resize(masks.grid[i].numpy(), up, order=1, mode="reflect", anti_aliasing=False)
        y, x = int(masks.shift_y[i]), int(masks.shift_x[i])
        np.testing.assert_allclose(m[i].numpy(), big[y:y + 18, x:x + 23], atol=1e-6)


def test_rise_same_seed_same_map_other_seed_other_map(net: Net) -> None:
    x = torch.randn(1, 3, 16, 16)
    a = RISE(masks=30, seed=1)(net, x, 2)
    torch.testing.assert_close(RISE(masks=30, seed=1)(net, x, 2), a)
    assert not torch.allclose(RISE(masks=30, seed=2)(net, x, 2), a)


@pytest.mark.parametrize("cls", [ScoreCAM, RISE], ids=["scorecam", "rise"])
def test_low_precision_is_a_setting_and_stays_near_float32(net: Net, cls) -> None:
    """low_precision enters the cache key as what runs (bfloat16 only where it is native); the map
    then moves by the rounding of the scores only."""
    x = torch.randn(2, 3, 16, 16)
    extra = {"layer": "block"} if cls is ScoreCAM else {"masks": 60}
    low = cls(low_precision=True, **extra).prepare(net, x[:1])
    assert low.settings["low_precision"] is low_precision_active(x.device)
    full = cls(low_precision=False, **extra).prepare(net, x[:1])
    assert full.settings["low_precision"] is False
    # on by default for RISE only, whose own sampling noise is far above the rounding; Score-CAM keeps
    # float32 parity with pytorch-grad-cam unless asked
    assert cls.DEFAULTS["low_precision"] is (cls is RISE)
    a, b = (_minmax(m.attribute(net, x, torch.tensor([2, 0])).maps) for m in (full, low))
    assert np.abs(a - b).max() < 0.05
    if low.settings["low_precision"]:
        assert np.abs(a - b).max() > 0  # the passes really ran in bfloat16


@pytest.mark.parametrize(("cls", "settings", "match"), [
    (RISE, {"p": 1.5}, "explain.rise.p must be a probability"),
    (RISE, {"p": 0}, "explain.rise.p must be a probability"),
    (RISE, {"masks": 0}, "explain.rise.masks must be a positive integer"),
    (RISE, {"cells": 2.5}, "explain.rise.cells must be a positive integer"),
    (RISE, {"seed": "one"}, "explain.rise.seed must be an integer"),
    (RISE, {"batch_size": 0}, "explain.rise.batch_size must be a positive integer"),
    (RISE, {"mask": 10}, "mask is not a setting of rise.*Did you mean: masks"),
    (ScoreCAM, {"batch_size": -1}, "explain.scorecam.batch_size must be a positive integer"),
    (AblationCAM, {"batch_size": "8"}, "explain.ablationcam.batch_size must be a positive integer"),
    (ScoreCAM, {"low_precision": "yes"}, "explain.scorecam.low_precision must be true or false"),
    (RISE, {"low_precision": 1}, "explain.rise.low_precision must be true or false"),
])
def test_bad_settings_name_the_setting(cls, settings: dict, match: str) -> None:
    with pytest.raises(PipelineError, match=match):
        cls(**settings)


def test_registered() -> None:
    assert (METHODS["scorecam"], METHODS["ablationcam"], METHODS["rise"]) == (ScoreCAM, AblationCAM, RISE)
