"""Every model source through every stage, on 20 tiny clutter-digit images.

Sources: the built-in digits_cnn and digits_cnn_fc (trained here for one epoch), efficientnet_lite0
(its packaged weights), torchvision's resnet18 and timm's test_resnet (random init), a
``torch.export`` program and a TorchScript file, both written by the test, and the custom ``_target_``
source instantiating :class:`SmallNet` from this file.

Each (source, stage) cell either runs and leaves its outputs, or is refused before any work with
one line naming the fix, leaving the cache as it was: stage=train on a model that is not built in,
and every stage that needs forward hooks on TorchScript. Nothing else may raise.
"""

from __future__ import annotations

import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.methods.registry import METHODS
from pipeline.models.digits import DigitsCNN
from pipeline.stages import NEEDS_HOOKS, STAGES, run_stages
from tests.helpers import compose_config
from tests.helpers import Block, trained_like

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

DATA = ["data.n_train=12", "data.n_test=8", "extract.batch_size=8"]
FAST = ["explain.select.limit=3", "explain.metrics.steps=4", "explain.metrics.curves_per_class=1",
        "explain.occlusion.window=16", "explain.occlusion.stride=16", "explain.rise.masks=16", "explain.rise.cells=4",
        "explain.smoothgrad.samples=2", "explain.integrated_gradients.steps=4", "explain.cam.fit.epochs=5",
        "visualize.ascent.steps=4", "visualize.top=4", "visualize.n_most_active=2", "visualize.sample=8",
        "visualize.classes=[1]", "visualize.all_classes_up_to=0",
        "report.sanity.images=1", "report.sanity.costly_images=1", "report.n_channels=2", "report.top_k=4",
        "audit.reliance.methods=[saliency]", "audit.outliers.k=3", "audit.duplicates.k=3"]
DEFAULT_METHODS = ["saliency", "occlusion", "cam", "gradcam"]
HOOK_FREE = [name for name, cls in METHODS.items() if not cls.needs_hooks]
DIGITS_STATS = ["model.mean=[0.1]", "model.std=[0.3]"]


class SmallNet(nn.Module):
    """conv-BN-ReLU-max-pool stem, a residual block, GAP, linear: BatchNorm, a skip and a
    functional ReLU for the export to keep."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.block = Block(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.block(self.stem(x))).flatten(1))


def write_model_files(folder: Path) -> tuple[Path, Path]:
    """A torch.export program of :class:`SmallNet` (the README's two lines) and a TorchScript digits CNN."""
    torch.manual_seed(0)
    model = trained_like(SmallNet())
    ep = torch.export.export(model.eval(), (torch.randn(2, 3, 32, 32),),
                             dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, folder / "small.pt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated: the point of the test
        torch.jit.script(DigitsCNN(width=8).eval()).save(str(folder / "digits.pt"))
    return folder / "small.pt2", folder / "digits.pt"


def sources(pt2: Path, script: Path) -> dict[str, list[str]]:
    """The overrides that select each model source."""
    return {
        "digits_cnn": ["model=digits_cnn", "model.width=8"],
        "digits_cnn_fc": ["model=digits_cnn_fc", "model.width=8"],
        # its 100 parameter layers at 224x224 make the full sanity cascade minutes long: the top three
        "efficientnet_lite0": ["model=efficientnet_lite0", "report.sanity.layers=[classifier,head.bn,head.conv]"],
        "torchvision": ["model=torchvision", "model.arch=resnet18", "model.num_classes=10", "model.image_size=64"],
        "timm": ["model=timm", "model.arch=test_resnet", "model.num_classes=10", "model.image_size=64"],
        "exported": ["model=exported", f"model.path={pt2}"],
        "torchscript": ["model=torchscript", f"model.path={script}", "model.channels=1", "model.image_size=64",
                        *DIGITS_STATS],
        "custom": ["model=custom", "model._target_=tests.test_model_matrix.SmallNet", "model.image_size=64"],
    }


SOURCES = [
    "digits_cnn", "exported", "torchscript", "custom",
    pytest.param("digits_cnn_fc", marks=pytest.mark.slow),
    pytest.param("efficientnet_lite0", marks=pytest.mark.slow),
    pytest.param("torchvision", marks=pytest.mark.slow),
    pytest.param("timm", marks=pytest.mark.slow),
]


def explain_methods(source: str) -> list[str]:
    """Every method on the exported program, the hook-free ones on TorchScript, the defaults elsewhere."""
    return {"exported": list(METHODS), "torchscript": HOOK_FREE}.get(source, DEFAULT_METHODS)


def refusal(source: str, stage: str) -> str | None:
    """What the one-line refusal of a cell must say, or None when the cell must run."""
    if stage == "train" and source not in ("digits_cnn", "digits_cnn_fc"):
        return "is not trainable here"
    if source == "torchscript" and stage in NEEDS_HOOKS:
        return "TorchScript modules do not take: export the model with torch.export"
    return None


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


@dataclass
class Cell:
    """What running one stage did: its summary, or its error and whether the cache changed."""

    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    crash: str | None = None
    cache_changed: bool = False
    seconds: float = 0.0


def run_cell(root: Path, overrides: list[str]) -> Cell:
    """Run one stage, keeping its summary, its one-line error, or the traceback of a crash."""
    before = files_under(root / "cache")
    start = time.perf_counter()
    cell = Cell()
    try:
        cell.summary = run_stages(compose_config(root, overrides))
    except PipelineError as e:
        cell.error = str(e)
        cell.cache_changed = files_under(root / "cache") != before
    except Exception:  # anything else is a crash the matrix reports
        cell.crash = traceback.format_exc()
    cell.seconds = time.perf_counter() - start
    return cell


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, Cell]]:
    """source -> {stage: Cell}, every stage run in order in one outputs folder per source (computed
    on first use, once)."""
    pt2, script = write_model_files(tmp_path_factory.mktemp("model_files"))
    overrides = sources(pt2, script)
    done: dict[str, dict[str, Cell]] = {}

    def cells(source: str) -> dict[str, Cell]:
        if source not in done:
            root = tmp_path_factory.mktemp(source)
            common = [*overrides[source], *DATA, *FAST, f"explain.methods=[{','.join(explain_methods(source))}]"]
            done[source] = {stage: run_cell(root, [*common, f"stage={stage}"]) for stage in STAGES}
            if source == "torchscript":  # a hook method in explain is refused before any work too
                done[source]["explain_hooks"] = run_cell(root, [*common, "stage=explain", "explain.methods=[gradcam]"])
            done[source]["root"] = Cell(summary={"root": str(root)})
        return done[source]
    return cells


def _outputs(stage: str, result: dict[str, Any], run: Path, source: str) -> None:
    """Assert what each stage leaves behind."""
    if stage == "train":
        assert 0 <= result["test_accuracy"] <= 1 and Path(result["checkpoint"]).is_file()
    elif stage == "layers":
        table = pd.read_csv(run / "layers.csv", keep_default_na=False)
        assert len(table) == result["layers"] > 0
        assert (table["shape"] != "").any() == (source != "torchscript")
        assert ("note" in result) == (source == "torchscript")
    elif stage == "methods":
        table = pd.read_csv(run / "methods.csv")
        assert len(table) == len(METHODS)
        hooked = table[table["method"].map(lambda m: METHODS[m].needs_hooks)]
        if source == "torchscript":
            assert hooked["applies"].str.contains("forward hooks").all()
        else:
            assert (hooked[hooked["method"].isin(["gradcam", "scorecam"])]["applies"] == "yes").all()
    elif stage == "extract":
        assert result["processed"] == 20 and Path(result["store"], "images.parquet").is_file()
    elif stage == "index":
        assert result["n_images"] == 20 and result["indexes_built"] >= 2
    elif stage == "query":
        assert result["rows"] == 5 and Path(result["table"]).is_file() and Path(result["grid"]).is_file()
    elif stage == "explain":
        table = pd.read_parquet(result["table"])
        assert set(table["method"].dropna()) >= set(explain_methods(source))
        assert any((run / "explain" / "panels").glob("*.png"))
    elif stage == "visualize":
        assert len(pd.read_parquet(result["index"])) > 0
    elif stage == "report":
        assert (run / "report.html").is_file() and "<html" in (run / "report.html").read_text()[:200].lower()
    elif stage == "audit":
        assert (run / "audit" / "audit.json").is_file()


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("source", SOURCES)
def test_every_source_through_every_stage(matrix, source: str, stage: str) -> None:
    cells = matrix(source)
    cell = cells[stage]
    assert cell.crash is None, f"{source} x {stage} crashed:\n{cell.crash}"
    expected = refusal(source, stage)
    if expected is not None:
        assert cell.error is not None, f"{source} x {stage} ran; it should be refused"
        assert "\n" not in cell.error and expected in cell.error, cell.error
        assert not cell.cache_changed, f"{source} x {stage} was refused but wrote into the cache"
        return
    assert cell.error is None, f"{source} x {stage}: {cell.error}"
    run = Path(cells["root"].summary["root"]) / "run"
    _outputs(stage, cell.summary["stages"][stage], run, source)


def test_torchscript_refuses_hook_methods_in_explain_up_front(matrix) -> None:
    cell = matrix("torchscript")["explain_hooks"]
    assert cell.crash is None and cell.error is not None and "\n" not in cell.error
    assert "needs forward hooks" in cell.error and "model=exported" in cell.error
    assert not cell.cache_changed
