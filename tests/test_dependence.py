"""Input dependence of projections and maps (Kindermans et al. 2017; Mahendran & Vedaldi 2016):
the pure maths, the deconvnet on networks with and without max-pool switches beside guided
backprop, the stride-grid score, and the visualize stage's choice and summary of projections."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from pipeline.errors import PipelineError
from pipeline.methods.deconvnet import deconvnet, max_pools_before
from pipeline.methods.dependence import (aligned, aligned_dependence, input_dependence, pairwise_spearman,
                                         stride_grid_share, unit_centre)
from pipeline.methods.guided import guided_projection
from pipeline.methods.receptive import receptive_field
from pipeline.projections import resolve_projections, summarize
from pipeline.stages import run_stages
from tests.helpers import compose_config


def no_pool_net() -> nn.Module:
    """Conv/ReLU only, two strided convolutions: the deconvnet never sees the image."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()).eval()


def pool_net() -> nn.Module:
    """The same with max-pooling instead of strides: switches that the deconvnet reads."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()).eval()


def projection_dependence(fn, net: nn.Module, x: torch.Tensor, layer: str, channel: int) -> float:
    """The stage's score: projections of each image's strongest unit, aligned on the unit."""
    res = fn(net, x, layer, channel)
    hw = tuple(net[: int(layer) + 1](x[:1]).shape[2:])
    centres = [unit_centre(p.tolist(), hw, x.shape[2:]) for p in res.position]
    return aligned_dependence(list(res.projection), centres, receptive_field(net, layer, tuple(x.shape[1:])))


def test_pairwise_spearman_matches_scipy_and_constant_maps_are_nan() -> None:
    maps = torch.randn(4, 5, 6)
    maps[1, 0, :3] = maps[1, 0, 3]  # ties
    corr = pairwise_spearman(maps)
    expected = spearmanr(maps.flatten(1).numpy().T).statistic
    assert torch.allclose(corr, torch.from_numpy(expected), atol=1e-9)
    with_constant = torch.cat([maps, torch.ones(1, 5, 6)])
    assert torch.isnan(pairwise_spearman(with_constant)[-1]).all()
    assert input_dependence(with_constant) == pytest.approx(float(corr[torch.triu_indices(4, 4, 1).unbind()].mean()))
    assert input_dependence(torch.stack([maps[0], 3 * maps[0] + 1])) == pytest.approx(1.0)
    assert math.isnan(input_dependence(maps[:1]))


def test_aligned_windows_compare_the_same_offsets_from_each_unit() -> None:
    pattern = torch.randn(2, 5, 5)
    a, b = torch.zeros(2, 12, 12), torch.zeros(2, 12, 12)
    a[:, 1:6, 2:7] = pattern            # unit centre (3, 4)
    b[:, 6:11, 5:10] = 2 * pattern      # unit centre (8, 7)
    va, vb = aligned(a, (3, 4), b, (8, 7), (5, 5))
    assert torch.equal(va, pattern.flatten()) and torch.equal(vb, 2 * pattern.flatten())
    va, vb = aligned(a, (0, 0), b, (11, 11), (6, 6))   # windows cut by both borders: offsets 0..0 in y and x
    assert va.shape == vb.shape == (2,)
    assert aligned(a, (0, 0), b, (11, 11), (1, 1))[0].numel() == 2
    assert aligned_dependence([a, b], [(3, 4), (8, 7)], (5, 5)) == pytest.approx(1.0)
    assert math.isnan(aligned_dependence([a, b], [(0, 0), (11, 11)], (6, 6), min_pixels=4))
    assert unit_centre((0, 3), (4, 4), (64, 64)) == (8, 56)


def test_deconvnet_without_max_pool_ignores_the_image_guided_backprop_does_not() -> None:
    net, x = no_pool_net(), torch.randn(6, 3, 32, 32)
    assert max_pools_before(net, x[:1], "5") == []
    deconv = projection_dependence(deconvnet, net, x, "5", 3)
    guided = projection_dependence(guided_projection, net, x, "5", 3)
    assert deconv > 0.9 and guided < 0.6     # not exactly 1: padding cuts a border unit's signal on the way back
    summary = summarize("deconvnet", {3: deconv}, [], (4, 4), "tiny", "5", [], 0.8, 0.3)
    assert summary["flagged"] and "no max-pool switches before 5" in summary["reason"]
    assert not summarize("guided_backprop", {3: guided}, [], (4, 4), "tiny", "5", [], 0.8, 0.3)["flagged"]


def test_deconvnet_with_max_pool_switches_depends_on_the_image() -> None:
    net, x = pool_net(), torch.randn(6, 3, 32, 32)
    assert max_pools_before(net, x[:1], "7") == ["2", "5"] and max_pools_before(net, x[:1], "1") == []
    assert projection_dependence(deconvnet, net, x, "7", 3) < 0.8


def test_stride_grid_share() -> None:
    torch.manual_seed(0)
    checker = torch.zeros(3, 32, 32)
    checker[:, ::4, ::4] = 1.0                                    # a lattice of period 4
    assert stride_grid_share(checker, (4, 4)) == pytest.approx(1.0)
    noise = torch.randn(3, 32, 32)
    assert stride_grid_share(noise, (4, 4)) < 0.05                # about 16 / 1024
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = torch.exp(-((yy - 16) ** 2 + (xx - 12) ** 2) / 30)
    assert stride_grid_share(blob, (4, 4)) < 0.3
    assert math.isnan(stride_grid_share(torch.ones(8, 8), (4, 4))) and math.isnan(stride_grid_share(noise, (1, 1)))


def test_resolve_projections_per_network_and_bad_value() -> None:
    def bundle(net: nn.Module) -> SimpleNamespace:
        return SimpleNamespace(module=net, input_shape=(3, 32, 32), name="tiny")

    methods, pools, why = resolve_projections(bundle(no_pool_net()), "5", "auto")
    assert methods == ["guided_backprop"] and pools == [] and "no max-pool layer before 5" in why
    methods, pools, why = resolve_projections(bundle(pool_net()), "7", "auto")
    assert methods == ["deconvnet", "guided_backprop"] and pools == ["2", "5"]
    assert resolve_projections(bundle(no_pool_net()), "5", "both")[0] == ["deconvnet", "guided_backprop"]
    assert resolve_projections(bundle(no_pool_net()), "5", "deconvnet")[0] == ["deconvnet"]
    with pytest.raises(PipelineError, match=r"visualize.projection='unpool' is not one of auto, deconvnet, "
                                            r"guided_backprop, both\.$"):
        resolve_projections(bundle(pool_net()), "7", "unpool")


def test_visualize_stage_scores_projections_and_writes_the_summary(tmp_path: Path) -> None:
    fast = ["visualize.ascent.steps=2", "visualize.top=4", "visualize.n_most_active=2", "visualize.classes=[]",
            "visualize.all_classes_up_to=0"]
    with pytest.raises(PipelineError, match="visualize.projection='guided' is not one of"):
        run_stages(compose_config(tmp_path, ["stage=visualize", "visualize.projection=guided", *fast]))
    assert not (tmp_path / "cache" / "artifacts" / "guided").exists()       # refused before any work
    summary = run_stages(compose_config(tmp_path, ["stage=[extract,visualize]", *fast]))["stages"]["visualize"]
    assert summary["projection"] == ["deconvnet", "guided_backprop"] and "features.pool1" in summary["projection_note"]
    folder = Path(summary["index"]).parent
    written = json.loads((folder / "projections.json").read_text())
    assert written["max_pools"] == ["features.pool1", "features.pool2"]
    index = pd.read_parquet(summary["index"])
    for method, kind in (("deconvnet", "deconv"), ("guided_backprop", "guided")):
        entry = written["methods"][method]
        rows = index[index.kind == kind]
        assert len(rows) == 2 * 4 and rows["grid_share"].between(0, 1).all()
        assert set(entry["per_channel"]) == {str(c) for c in summary["channels"]}
        per_row = rows.groupby("channel")["input_dependence"].first()
        assert np.allclose([entry["per_channel"][str(c)] for c in per_row.index], per_row.to_numpy())
        assert summary["input_dependence"][method] == pytest.approx(entry["input_dependence"], abs=1e-4)
        assert entry["flagged"] == (entry["input_dependence"] > 0.8) and entry["projections"] == 8
        assert (folder / f"{kind}__features.relu4__c{summary['channels'][0]}.png").is_file()
    again = run_stages(compose_config(tmp_path, ["stage=visualize", *fast]))["stages"]["visualize"]
    assert again["computed"] == 0 and again["input_dependence"] == summary["input_dependence"]
    only = run_stages(compose_config(tmp_path, ["stage=visualize", "visualize.projection=guided_backprop",
                                                *fast]))["stages"]["visualize"]
    assert only["deconv_mode"] is None and only["deconv_images"] == 0 and only["guided_images"] == 8
    assert only["computed"] == 0                      # guided pictures are shared with the run above
