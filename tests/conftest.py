"""Shared fixtures: the real Hydra config, composed and shrunk for tests, and the small models many
tests run on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import DictConfig
from torch import nn

from pipeline.models.digits import DigitsCNN, DigitsCNNFC
from tests.helpers import compose_config

torch.set_num_threads(1)  # the CI machine has 2 cores; tiny models run fastest single-threaded


@pytest.fixture
def make_cfg(tmp_path: Path):
    """compose(overrides) -> config with tiny data and outputs in a temporary folder."""
    def make(overrides: list[str] | None = None, tiny: bool = True) -> DictConfig:
        return compose_config(tmp_path, overrides, tiny)
    return make


@pytest.fixture(scope="module")
def digits() -> DigitsCNN:
    """The built-in digits CNN with seeded random weights, in eval mode (one per test module)."""
    torch.manual_seed(0)
    return DigitsCNN().eval()


@pytest.fixture(scope="module")
def digits_fc() -> DigitsCNNFC:
    """The flatten + FC variant of the digits CNN, seeded, in eval mode."""
    torch.manual_seed(0)
    return DigitsCNNFC().eval()


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    """A torchvision ResNet-18 with random weights and 7 classes, in eval mode."""
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=7).eval()


@pytest.fixture(scope="session")
def shared_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One outputs folder shared by tests that reuse the tiny trained model and dataset."""
    return tmp_path_factory.mktemp("shared_outputs")
