"""Config checks before any work: bad types, out-of-range values and misspelt keys fail in one line
with exit status 2; --help is the app's own; the run folder's log is named after the app."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config_check import check_config
from pipeline.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGS`` from a temporary folder, outputs there too."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, "-m", "pipeline", f"paths.outputs={tmp_path / 'out'}", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("override, line", [
    ("train.epochs=abc", "error: train.epochs='abc' is not valid: expected a positive integer."),
    ("explain.occlusion.stride=-1", "error: explain.occlusion.stride=-1 is not valid: expected a positive integer."),
    ("progress=1", "error: progress=1 is not valid: expected true or false."),
    ("train.epohcs=3", "error: unknown key train.epohcs (given train.epohcs=3). Did you mean: train.epochs"),
])
def test_bad_values_fail_in_one_line_with_status_2(tmp_path: Path, override: str, line: str) -> None:
    result = cli(tmp_path, "stage=layers", override)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "cache").exists()  # failed before any work (no data, no model)


def test_help_lists_stages_groups_and_examples(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pipeline", "--help"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    for stage in ("train", "layers", "methods", "extract", "index", "query", "explain", "visualize", "report",
                  "audit"):
        assert f"\n  {stage} " in result.stdout
    groups = dict(line.split(": ", 1) for line in result.stdout.splitlines() if line.startswith(("model: ", "data: ")))
    assert "digits_cnn_fc" in groups["model"] and "photos" in groups["data"]  # $APP_CONFIG_GROUPS
    assert "python -m pipeline stage=query" in result.stdout


def test_run_log_is_named_after_the_app(tmp_path: Path) -> None:
    cli(tmp_path, "stage=layers", "train.epochs=0")
    logs = [p.name for p in (tmp_path / "out" / "runs").rglob("*.log")]
    assert logs == ["pipeline.log"]


@pytest.mark.parametrize("choice", sorted(f"{p.parent.name}={p.stem}" for group in ("model", "data")
                                           for p in (ROOT / "conf" / group).glob("*.yaml")))
def test_every_shipped_config_passes(make_cfg, choice: str) -> None:
    """The check derives types from the defaults, so each shipped option passes with its own."""
    check_config(make_cfg([choice]))


@pytest.mark.parametrize("override, expected", [
    ("train.lr=1", None),                            # an int where a float is: fine
    ("explain.target=3", None),                      # a class index where a name is: fine
    ("visualize.channels='0:8'", None),              # the default is null: anything
    ("explain.rise.p=1.5", "explain.rise.p=1.5 is not valid: expected a number in [0, 1]."),
    ("train.lr=fast", "train.lr='fast' is not valid: expected a positive number."),
    ("train.epochs=null", "train.epochs=null is not valid: expected a positive number."),
    ("shard=-1", "shard=-1 is not valid: expected a number >= 0."),
    ("explain.select.query.k=2.5", "explain.select.query.k=2.5 is not valid: expected a positive integer."),
])
def test_types_and_ranges(make_cfg, override: str, expected: str | None) -> None:
    cfg = make_cfg([override])
    if expected is None:
        check_config(cfg)
    else:
        with pytest.raises(PipelineError) as e:
            check_config(cfg)
        assert str(e.value) == expected
