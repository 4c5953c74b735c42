"""Adebayo et al. sanity checks: Spearman, cascading randomisation and the class check."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from pipeline.errors import PipelineError
from pipeline.methods.gradcam import gradcam
from pipeline.methods.sanity import (cascading_randomization, class_check, parameter_layers,
                                     rank_average, reinitialize, relative_l2, spearman)
from pipeline.methods.saliency import saliency_map
from pipeline.models.digits import DigitsCNN


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


def test_rank_average_gives_ties_their_mean_rank() -> None:
    assert rank_average(torch.tensor([3.0, 1.0, 2.0, 2.0])).tolist() == [3.0, 0.0, 1.5, 1.5]
    assert rank_average(torch.tensor([[5.0, 5.0, 5.0]])).tolist() == [[1.0, 1.0, 1.0]]


def test_spearman_matches_scipy() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 6, (4, 7, 9), generator=gen).float()  # many ties
    b = a + torch.randint(0, 4, (4, 7, 9), generator=gen).float()
    ours = spearman(a, b)
    for i in range(4):
        expected = spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy()).statistic
        assert ours[i].item() == pytest.approx(expected, abs=1e-12)
    assert spearman(a, -a).tolist() == pytest.approx([-1.0] * 4)
    assert torch.isnan(spearman(torch.ones(1, 5), torch.arange(5.0)[None])).all()
    with pytest.raises(PipelineError, match="shapes"):
        spearman(a, b[:2])


def test_reinitialize_is_seeded_and_keeps_the_global_rng() -> None:
    a, b = tiny(), tiny()
    state = torch.random.get_rng_state()
    reinitialize(a[2], seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    reinitialize(b[2], seed=5)
    assert torch.equal(a[2].weight, b[2].weight)
    assert not torch.equal(a[2].weight, tiny()[2].weight)
    reinitialize(b[2], seed=6)
    assert not torch.equal(a[2].weight, b[2].weight)

    class Scaled(nn.Module):  # a parameter with no reset_parameters is redrawn from a normal
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.full((50,), 3.0))

    s = Scaled()
    reinitialize(s, seed=0)
    assert not torch.equal(s.gain, torch.full((50,), 3.0)) and s.gain.std() > 0.5


def test_cascade_lowers_the_correlation_and_leaves_the_model_alone() -> None:
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    assert parameter_layers(model) == ["6", "2", "0"]
    original, steps = cascading_randomization(model, x, 1, saliency_map, seed=3)
    torch.testing.assert_close(original, saliency_map(model, x, 1))
    assert [s.layer for s in steps] == ["6", "2", "0"]
    for step in steps:
        assert step.map.shape == (3, 16, 16)
        assert (step.spearman < 0.9).all()
    assert steps[-1].spearman.abs().mean() < 0.5
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    again = cascading_randomization(model, x, 1, saliency_map, seed=3)[1]
    torch.testing.assert_close(again[-1].map, steps[-1].map)
    with pytest.raises(PipelineError, match="Unknown layer"):
        cascading_randomization(model, x, 1, saliency_map, layers=["7"])


def test_cascade_with_gradcam_and_named_blocks() -> None:
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(2))

    def method(m: nn.Module, images: torch.Tensor, target: object) -> torch.Tensor:
        return gradcam(m, images, target, "features.relu3")

    _, steps = cascading_randomization(model, x, [0, 5], method, layers=["fc", "features"])
    assert [s.layer for s in steps] == ["fc", "features"]
    assert (steps[-1].spearman < 0.9).all()


def test_class_check() -> None:
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(4))
    check = class_check(model, x, 0, 1, saliency_map)
    assert check.map_a.shape == (2, 64, 64)
    assert (check.spearman < 0.95).all() and (check.relative_l2 > 0.1).all()
    same = class_check(model, x, 3, 3, saliency_map)
    torch.testing.assert_close(same.spearman, torch.ones(2, dtype=torch.float64))
    assert same.relative_l2.eq(0).all()
    assert relative_l2(torch.zeros(1, 4), torch.zeros(1, 4)).item() == 0.0
    assert relative_l2(torch.ones(1, 4), -torch.ones(1, 4)).item() == pytest.approx(2.0)
