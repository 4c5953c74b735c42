"""The package as a user installs it: a wheel (not editable) carries its configs and runs from any
folder, by ``python -m pipeline`` and by the ``cnn-explain`` console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data.sources import _photos
from pipeline.errors import PipelineError
from pipeline.models.bundle import _timm

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
TINY = ["stage=layers", "data.n_train=80", "data.n_test=40", "train.epochs=1", "progress=false", "device=cpu"]


def test_pyproject_lists_every_package() -> None:
    """pyproject lists the packages by hand (to map conf/ into pipeline.conf): none may be missing."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "pipeline").rglob("*.py")}
    assert found <= listed and listed - found == {"pipeline.conf"}


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{cmd}: {result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result


@pytest.mark.slow
def test_wheel_installs_and_runs_from_another_folder(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    # build from a copy: setuptools writes build/ and *.egg-info into the source folder, and a stale
    # build/lib there could slip deleted modules into the wheel
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "outputs", "build", "dist", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", ".benchmarks"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
         str(tmp_path / "dist"), str(src)], tmp_path, env)
    wheel = next((tmp_path / "dist").glob("cnn_explain_pipeline-*.whl"))
    # the dependencies come from this environment's site-packages; the wheel's copy of pipeline wins
    # over the editable install there (whose finder comes after the venv's own site-packages)
    run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp_path / "venv")], tmp_path, env)
    bin_dir = tmp_path / "venv" / "bin"
    run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], tmp_path, env)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run([str(bin_dir / "python"), "-c", "import pipeline, pipeline.config_check as c; "
                 "print(pipeline.__file__); print(c.CONF_DIR)"], work, env).stdout.split()
    assert all(Path(p).is_relative_to(tmp_path / "venv") for p in where), where
    assert Path(where[1], "model", "digits_cnn.yaml").is_file() and Path(where[1], "hydra", "help").is_dir()

    outputs = f"paths.outputs={work / 'outputs'}"
    by_module = run([str(bin_dir / "python"), "-m", "pipeline", outputs, *TINY], work, env)
    assert "features.relu4" in by_module.stdout and "layers: layers=" in by_module.stdout
    by_script = run([str(bin_dir / "cnn-explain"), outputs, *TINY], work, env)
    assert "features.relu4" in by_script.stdout
    assert "cache: 2 hits" in by_script.stdout  # the same configs, so the same cached data and model
    assert "Stages" in run([str(bin_dir / "cnn-explain"), "--help"], work, env).stdout


@pytest.mark.parametrize("module, call, extra", [
    ("timm", lambda: _timm({"arch": "resnet18"}), "timm"),
    ("skimage", lambda: _photos({}, None), "photos"),
])
def test_optional_feature_without_its_package_names_the_install(monkeypatch, module: str, call, extra: str) -> None:
    """timm and scikit-image are extras: the feature that needs one says which pip install adds it."""
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    monkeypatch.setitem(sys.modules, f"{module}.data", None)
    with pytest.raises(PipelineError, match=rf"pip install 'cnn-explain-pipeline\[{extra}\]'"):
        call()
