"""The one capture module: first-call rule for reused modules, stopping, nesting, cleanup."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from pipeline.errors import PipelineError
from pipeline.methods.activations import channel_stats, record_stats
from pipeline.methods.hooks import capture, forward_until, recording, truncated_forward, watching
from pipeline.models.layers import layer_table

ROOT = Path(__file__).resolve().parents[1]


def _block_net() -> nn.Module:
    """A conv and one torchvision BasicBlock, whose single ``relu`` module runs twice per forward."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), BasicBlock(4, 4), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3)).eval()


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_reused_module_is_read_at_its_first_call_everywhere() -> None:
    net = _block_net()
    x = torch.randn(2, 1, 8, 8)
    block = net[1]
    first = torch.relu(block.bn1(block.conv1(net[0](x))))  # the relu's first call in the block
    with torch.no_grad():
        via_stop = forward_until(net, "1.relu", x)
        with capture(net, "1.relu") as cap:
            net(x)
        with record_stats(net, ["1.relu"]) as stats:
            net(x)
    torch.testing.assert_close(via_stop, first)
    torch.testing.assert_close(cap.output, first)
    assert cap.calls == 2
    for got, want in zip(stats["1.relu"][:3], channel_stats(first)[:3]):
        torch.testing.assert_close(got, want)
    assert _no_hooks(net)


def test_layer_table_counts_calls() -> None:
    table = {li.name: li for li in layer_table(_block_net(), (1, 8, 8))}
    assert table["1.relu"].calls == 2 and table["1.conv1"].calls == 1 and table["1"].calls == 1
    assert table["1.relu"].shape == (4, 8, 8)


def test_each_forward_starts_afresh_and_records_once() -> None:
    net = _block_net()
    seen = []
    with torch.no_grad(), recording(net, ["0", "1.relu"], retain=False,
                                    on_output=lambda name, out: seen.append(name)) as rec:
        for _ in range(3):
            rec.run(torch.randn(1, 1, 8, 8))
    assert seen == ["0", "1.relu"] * 3  # the relu's second call is not reported
    with pytest.raises(PipelineError, match="not called"):
        rec["0"].output  # retain=False keeps nothing


def test_captures_hold_the_latest_forward_and_hooks_are_removed() -> None:
    net = _block_net()
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        want = net(x)
    with torch.no_grad(), recording(net, ["4"], stop=True) as outer:
        assert outer.run(x) is None  # stopped after the last wanted layer
        inner = truncated_forward(net, x, ["0"])  # its own stop signal, inside the outer recording
        with pytest.raises(PipelineError, match="not called"):
            outer["4"].output  # the latest forward stopped before layer 4
        outer.run(x)
        torch.testing.assert_close(outer["4"].output, want)
    assert inner["0"].shape == (1, 4, 8, 8)
    with pytest.raises(RuntimeError, match="boom"), recording(net, ["0"]):
        raise RuntimeError("boom")
    assert _no_hooks(net)


def test_watching_lists_calls_in_order() -> None:
    net = _block_net()
    with torch.no_grad(), watching(net, lambda name, m: isinstance(m, nn.ReLU)) as calls:
        net(torch.randn(1, 1, 8, 8))
    assert [c.name for c in calls] == ["1.relu", "1.relu"]
    assert calls[0].input is not None and calls[0].version >= 0


def test_unknown_layer_names_close_match() -> None:
    with pytest.raises(PipelineError, match="Did you mean"):
        forward_until(_block_net(), "1.rleu", torch.randn(1, 1, 8, 8))


def test_hooks_are_registered_only_in_the_hooks_module() -> None:
    """One home for hooks: no other module of the package registers a module hook itself."""
    pattern = re.compile(r"register_forward_(pre_)?hook|register_full_backward")
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "pipeline").rglob("*.py")
                 if p.name != "hooks.py" and pattern.search(p.read_text())]
    assert offenders == []
