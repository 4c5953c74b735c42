"""Shared fixtures: the real Hydra config, composed and shrunk for tests, and the small models many
tests run on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict, read_write
from torch import nn

from pipeline.models.digits import DigitsCNN, DigitsCNNFC

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
TINY = ["++data.n_train=80", "++data.n_test=40", "train.data={n_train:80,n_test:40}", "train.epochs=1", "progress=false", "device=cpu"]

torch.set_num_threads(1)  # the CI machine has 2 cores; tiny models run fastest single-threaded


def compose_config(tmp_path: Path, overrides: list[str] | None = None, tiny: bool = True) -> DictConfig:
    """The real config with outputs under ``tmp_path``; HydraConfig is set as under @hydra.main."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=(TINY if tiny else []) + [f"paths.outputs={tmp_path}"] + (overrides or []),
                      return_hydra_config=True)
    (tmp_path / "run").mkdir(parents=True, exist_ok=True)
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    HydraConfig().set_config(cfg)
    return cfg


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
