"""What the command line tells the shell: 0 ok, 2 a user error, 3 an internal error (one line, the
traceback in the log; 1, a failed audit, is tested in test_audit), status.json in every run folder,
a stage that needs a store failing before it trains anything, and a sweep whose failing middle job
neither stops the others nor hides in the summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.sweep import CSV_NAME

ROOT = Path(__file__).resolve().parents[1]
TINY = ["++data.n_train=80", "++data.n_test=40", "train.epochs=1", "progress=false", "device=cpu"]


def cli(outputs: Path, *args: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(prefix or ["-m", "pipeline"]), *args, f"paths.outputs={outputs}", *TINY]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


def status(outputs: Path) -> dict:
    (found,) = list((outputs / "runs").glob("*/*/status.json"))
    return json.loads(found.read_text())


def test_ok_user_error_and_internal_error_exit_statuses(tmp_path: Path) -> None:
    ok = cli(tmp_path / "ok", "stage=layers")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert status(tmp_path / "ok") == {"status": "ok", "exit": 0, "message": ""}

    user = cli(tmp_path / "user", "stage=extrct")
    assert user.returncode == 2 and "Traceback" not in user.stderr
    assert user.stderr.strip().splitlines()[-1].startswith("error: unknown stage 'extrct'. Did you mean: extract?")
    assert status(tmp_path / "user")["status"] == "error"

    # the real entry point with a stage runner that hits a bug
    crash = ["-c", "import sys, pipeline.stages as s\n"
                   "def boom(cfg): raise RuntimeError('index 7 is out of bounds')\n"
                   "s.run_stages = boom\n"
                   "import runpy\n"
                   "runpy.run_module('pipeline', run_name='__main__', alter_sys=True)"]
    internal = cli(tmp_path / "internal", "stage=layers", prefix=crash)
    assert internal.returncode == 3 and "Traceback" not in internal.stderr
    last = internal.stderr.strip().splitlines()[-1]
    assert last.startswith("internal error: RuntimeError: index 7 is out of bounds (the traceback is at the end of ")
    log = Path(last.rsplit("the end of ", 1)[1].rstrip(")"))
    assert log.is_file() and "Traceback" in log.read_text() and "index 7 is out of bounds" in log.read_text()
    assert status(tmp_path / "internal")["exit"] == 3


def test_a_stage_that_reads_the_store_fails_before_training_anything(tmp_path: Path) -> None:
    proc = cli(tmp_path, "stage=query")
    assert proc.returncode == 2
    assert "stage=query reads the activation store, and there is none yet: digits_cnn has not been trained here" \
        in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "cache" / "models").exists()
    assert "training digits_cnn" not in proc.stderr + proc.stdout


@pytest.mark.slow
def test_a_failing_middle_job_neither_stops_the_sweep_nor_hides(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = cli(tmp_path, "-m", "stage=layers,query,methods", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    df = pd.read_csv(sweep / CSV_NAME)
    assert df["status"].tolist() == ["ok", "error", "ok"] and df["exit"].tolist() == [0, 2, 0]
    assert "no activation store" in df["message"][1]
    assert "job 1: error: no activation store" in proc.stderr and "1 of 3 jobs did not succeed" in proc.stderr
    assert (sweep / "2" / "summary.json").is_file()           # the job after the failure ran


def test_result_tables_go_to_the_log_and_bars_follow_progress(tmp_path: Path) -> None:
    proc = cli(tmp_path, "stage=layers")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (log,) = list((tmp_path / "runs").glob("*/*/*.log"))
    text = log.read_text()
    assert "features.relu4" in text and "run folder:" in text and "cache:" in text   # the tables, logged
    assert proc.stdout.count("run folder:") == 1                                        # printed once
    assert "it/s" not in proc.stderr and "batch/s" not in proc.stderr                    # progress=false
