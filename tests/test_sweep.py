"""Sweep summaries: the Hydra callback's table and page from job folders, its place in the config,
and a real two-job multirun through the command line with the joblib launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from pipeline.sweep import CSV_NAME, HTML_NAME, SweepSummary, flatten, summarize_sweep
from tests.helpers import compose_config

ROOT = Path(__file__).resolve().parents[1]


def _job(sweep: Path, name: str, overrides: list[str], summary: dict | None) -> Path:
    """A job folder as a run leaves it: a failed job has a status.json saying why, no summary."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if summary is not None:
        (job / "summary.json").write_text(json.dumps(summary))
    status = {"status": "ok", "exit": 0, "message": ""} if summary is not None else \
        {"status": "error", "exit": 2, "message": "error: unknown model"}
    (job / "status.json").write_text(json.dumps(status))
    return job


def _summary(model: str, accuracy: float) -> dict:
    return {"run_dir": f"/somewhere/{model}", "dataset": {"name": "clutter_digits", "images": 120},
            "model": {"name": model, "classes": 10},
            "stages": {"train": {"model": model, "test_accuracy": accuracy, "seconds": 2.5,
                                 "checkpoint": f"/cache/{model}.pt"},
                       "explain": {"seconds": 1.0, "quality": {"cam": {"pointing": 0.9}}, "methods": ["cam", "x"]}},
            "cache": {"models": {"hits": 1, "misses": 0}, "data": {"hits": 0, "misses": 1}}}


def test_flatten_nested_summaries() -> None:
    flat = dict(flatten({"a": {"b": 1, "c": {"d": "x"}}, "l": [1, 2], "long": list(range(50)), "objs": [{}]}))
    assert flat == {"a.b": 1, "a.c.d": "x", "l": "1,2"}


def test_sweep_summary_table_and_page_from_job_folders(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    _job(sweep, "0", ["stage=train", "model=digits_cnn"], _summary("digits_cnn", 0.9))
    _job(sweep, "1", ["stage=train", "model=<b>fc</b>"], _summary("<b>fc</b>", 0.8))
    _job(sweep, "10", ["stage=train", "model=digits_cnn_fc"], None)  # failed: a status, no summary
    (sweep / "1" / "report.html").write_text("<html></html>")
    df = summarize_sweep(sweep)
    assert df["job"].tolist() == ["0", "1", "10"]
    assert df["status"].tolist() == ["ok", "ok", "error"] and df["message"][2] == "error: unknown model"
    assert df["override:model"].tolist() == ["digits_cnn", "<b>fc</b>", "digits_cnn_fc"]
    assert df["stages.train.test_accuracy"].tolist()[:2] == [0.9, 0.8]
    assert df["stages.explain.quality.cam.pointing"][0] == 0.9 and df["seconds"][0] == 3.5
    assert df["cache.hits"][0] == 1 and df["cache.misses"][0] == 1

    with pytest.raises(SystemExit) as ended:     # a failed job: the sweep exits with its status
        SweepSummary().on_multirun_end(config=OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert ended.value.code == 2
    csv = pd.read_csv(sweep / CSV_NAME)
    assert len(csv) == 3 and list(csv.columns[:5]) == ["job", "status", "exit", "message", "overrides"]
    page = (sweep / HTML_NAME).read_text()
    assert "<b>fc</b>" not in page and "&lt;b&gt;fc&lt;/b&gt;" in page
    assert '<a href="1/report.html">1</a>' in page and f'<a href="{CSV_NAME}">' in page
    assert "stages.train.test_accuracy" in page and "/cache/digits_cnn.pt" not in page  # paths stay in the CSV
    same = page.split(">Same in every job</h2>")[1]
    assert "dataset.name" in same and "clutter_digits" in same


def test_sweep_summary_is_a_configured_hydra_callback(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path)
    callbacks = cfg.hydra.get("callbacks") or {}
    assert [c.get("_target_") for c in callbacks.values()].count("pipeline.sweep.SweepSummary") == 1, (
        "conf/config.yaml needs hydra.callbacks.sweep_summary._target_: pipeline.sweep.SweepSummary")


@pytest.mark.slow
def test_joblib_multirun_ends_with_a_sweep_summary(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline", "-m", "hydra/launcher=local_joblib", "stage=train",
           "model=digits_cnn,digits_cnn_fc", "++data.n_train=80", "++data.n_test=40", "train.epochs=1",
           "progress=false", f"paths.outputs={tmp_path}", "hydra.sweep.dir=" + str(tmp_path / "sweep")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "sweep"
    assert f"sweep summary (2 jobs): {sweep / CSV_NAME}" in proc.stdout
    df = pd.read_csv(sweep / CSV_NAME)
    assert df["status"].tolist() == ["ok", "ok"]
    assert df["override:model"].tolist() == ["digits_cnn", "digits_cnn_fc"]
    assert df["model.name"].tolist() == ["digits_cnn", "digits_cnn_fc"]
    assert df["stages.train.test_accuracy"].between(0, 1).all()
    page = (sweep / HTML_NAME).read_text()
    assert "digits_cnn_fc" in page and "stages.train.test_accuracy" in page
