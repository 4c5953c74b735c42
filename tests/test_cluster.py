"""Scale-out through the real command line: stage=index names the shards that have not finished
(and their jobs) and waits for them; against a real slurmctld (``scripts/local_slurm.sh``; skipped
with the reason where there is none), sharded extraction and a sharded whole-split explain as SLURM
array jobs, a job killed by the scheduler and submitted again, and the checks made before anything
is submitted."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.runtime import Context
from tests.helpers import compose_config
from tests.helpers import assert_same_store, store_state

ROOT = Path(__file__).resolve().parents[1]
TINY = ["++data.n_train=80", "++data.n_test=40", "train.epochs=1", "progress=false", "device=cpu"]


def cli(outputs: Path, *args: str, multirun: bool = False, env: dict | None = None,
        timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline", *(["-m"] if multirun else []), *args, f"paths.outputs={outputs}", *TINY]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def up_partition() -> str | None:
    """A partition of a running SLURM cluster here, else None."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %a %T"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        name, avail, state = (line.split() + ["", "", ""])[:3]
        if avail == "up" and state in ("idle", "mixed", "allocated"):
            name = name.rstrip("*")
            try:  # a cluster that is up but cannot run a job (munge, spool) is no cluster for these tests
                probe = subprocess.run(["sbatch", "--wait", "-p", name, "-c", "1", "--mem=100M", "-o", "/dev/null",
                                        "--wrap", "true"], capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired):
                return None
            return name if probe.returncode == 0 else None
    return None


@pytest.fixture(scope="module")
def partition() -> str:
    """The partition of a SLURM cluster that runs a test job (probed once, only for the tests that
    need one); the test is skipped, with the reason, where there is none."""
    name = up_partition()
    if name is None:
        pytest.skip("no SLURM cluster here that runs a test job: `sudo scripts/local_slurm.sh` starts one "
                    "(Debian: apt-get install slurm-wlm munge)")
    return name


def slurm(partition: str) -> list[str]:
    """The launcher overrides of a small SLURM sweep on ``partition``."""
    return ["hydra/launcher=slurm", f"hydra.launcher.partition={partition}", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=20"]


def generation(outputs: Path) -> int:
    return Context(compose_config(outputs, ["stage=query"])).store().generation


def single_run_state(tmp_path: Path) -> dict:
    """The store of one unsharded extract with the same trained model (its cache copied)."""
    single = tmp_path / "single"
    single.mkdir()
    shutil.copytree(tmp_path / "cache" / "models", single / "cache" / "models")
    ok(cli(single, "stage=extract"))
    return store_state(Context(compose_config(single, ["stage=query"])))


def wait_until_gone(job: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, f"job {job} still queued"
        time.sleep(0.5)


@pytest.mark.slow
def test_index_names_the_unfinished_shards_and_waits_for_them(tmp_path: Path) -> None:
    ok(cli(tmp_path, "stage=train"))
    env = {**os.environ, "SLURM_JOB_ID": "4242", "PIPELINE_STORE_CRASH_AT": "journal_written:1"}
    killed = cli(tmp_path, "stage=extract", "shard=1", "num_shards=2", "extract.part_size=8", env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    early = cli(tmp_path, "stage=index")
    assert early.returncode == 2 and "Traceback" not in early.stderr
    line = early.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: stage=index: 2 of 2 shards have not finished: shard 0, 1 \(SLURM jobs 1: 4242\), "
                        r"\d+ images still to extract\. .*`python -m pipeline stage=extract shard=0 num_shards=2`; "
                        r"nothing was merged\.", line), line
    late = cli(tmp_path, "stage=index", "index.wait=true", "index.wait_timeout_s=1", "index.poll_s=0.2")
    assert late.returncode == 2 and "after waiting 1 s: 2 of 2 shards" in late.stderr
    assert generation(tmp_path) == 0
    cmd = [sys.executable, "-m", "pipeline", "stage=index", "index.wait=true", "index.poll_s=0.5",
           f"paths.outputs={tmp_path}", *TINY]
    waiting = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for shard in (1, 0):
        ok(cli(tmp_path, "stage=extract", f"shard={shard}", "num_shards=2", "extract.part_size=8"))
    out, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, err[-2000:]
    assert "merged_shards=2" in out and "n_images=120" in out
    assert_same_store(store_state(Context(compose_config(tmp_path, ["stage=query"]))), single_run_state(tmp_path))


@pytest.mark.slow
def test_slurm_array_extraction_then_index_equals_a_single_run(tmp_path: Path, partition: str) -> None:
    ok(cli(tmp_path, "stage=train"))
    sweep = ok(cli(tmp_path, *slurm(partition), "stage=extract", "shard=0,1", "num_shards=2", multirun=True))
    assert "sacct" not in sweep.stderr + sweep.stdout and "Slurm accounting" not in sweep.stderr
    logs = sorted((tmp_path / "multirun").glob("*/*/slurm/*_*/*_log.out"))
    assert len(logs) == 2 and all("extract" in p.read_text() for p in logs)   # one log per shard
    ok(cli(tmp_path, "stage=index"))
    assert_same_store(store_state(Context(compose_config(tmp_path, ["stage=query"]))), single_run_state(tmp_path))


@pytest.mark.slow
def test_slurm_sharded_whole_split_explain_is_found_by_the_audit(tmp_path: Path, partition: str) -> None:
    explain = ["explain.select.all=true", "explain.select.split=test", "explain.methods=[saliency,gradcam]",
               "explain.causal.enabled=false"]
    ok(cli(tmp_path, "stage=[train,extract]"))
    ok(cli(tmp_path, *slurm(partition), "stage=explain", *explain, "shard=0,1", "num_shards=2", multirun=True))
    ok(cli(tmp_path, "stage=audit", *explain, "audit.reliance.methods=[saliency,gradcam]",
           "audit.reliance.split=test", "explain.causal.enabled=false"))
    audit = json.loads(next((tmp_path / "runs").glob("*/*/audit/audit.json")).read_text())
    assert audit["reliance"]["maps_computed"] == 0
    assert {r["method"] for r in audit["reliance"]["per_class"]} == {"saliency", "gradcam"}


@pytest.mark.slow
def test_a_job_killed_by_the_scheduler_resumes_when_submitted_again(tmp_path: Path, partition: str) -> None:
    ok(cli(tmp_path, "stage=train"))
    args = [sys.executable, "-m", "pipeline", "stage=extract", "shard=1", "num_shards=2", "extract.part_size=8",
            f"paths.outputs={tmp_path}", *TINY]
    script = " ".join(args)

    def submit(env: dict) -> str:
        out = subprocess.run(["sbatch", "--parsable", "-p", partition, "-c", "1", "--mem=2G",
                              "-o", str(tmp_path / "job-%j.out"), "--wrap", script],
                             capture_output=True, text=True, env=env, cwd=ROOT, check=True)
        return out.stdout.strip().split(";")[0]

    job = submit({**os.environ, "PIPELINE_STORE_PAUSE_AT": "journal_written:2"})   # holds after two parts
    journal: Path | None = None
    deadline = time.monotonic() + 300
    while journal is None:
        found = list((tmp_path / "cache" / "store").glob("*/.work/*/s001of002/journal.json"))
        parts = json.loads(found[0].read_text())["parts"] if found else []
        if len(parts) >= 2:
            journal = found[0]
        assert time.monotonic() < deadline, "the job did not write two parts"
        time.sleep(0.5)
    subprocess.run(["scancel", job], check=True)
    wait_until_gone(job)
    assert json.loads((journal.parent / "job.json").read_text())["slurm_job"] == job
    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_STORE_PAUSE_AT"}
    again = submit(env)
    wait_until_gone(again)
    ok(cli(tmp_path, "stage=extract", "shard=0", "num_shards=2"))
    index = ok(cli(tmp_path, "stage=index"))
    assert "merged_shards=2" in index.stdout
    assert_same_store(store_state(Context(compose_config(tmp_path, ["stage=query"]))), single_run_state(tmp_path))
    resumed = (tmp_path / f"job-{again}.out").read_text()
    assert re.search(r"processed=\d+, skipped=16", resumed), resumed[-1500:]   # the two killed parts were kept


@pytest.mark.slow
def test_a_bad_partition_or_job_size_is_one_line_before_anything_is_submitted(tmp_path: Path, partition: str) -> None:
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    bad = cli(tmp_path, *slurm(partition), "hydra.launcher.partition=nope", "stage=extract", "shard=0,1", "num_shards=2",
              multirun=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        f"error: hydra.launcher.partition=nope does not exist on this cluster; partitions: {partition}.")
    big = cli(tmp_path, *slurm(partition), "hydra.launcher.cpus_per_task=4096", "stage=extract", "shard=0,1", "num_shards=2",
              multirun=True)
    assert big.returncode == 2 and "no node of partition" in big.stderr and "cpus_per_task" in big.stderr
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before
    assert not (tmp_path / "cache").exists()


def test_no_slurm_on_the_machine_is_one_line(tmp_path: Path) -> None:
    """Without sbatch/sinfo on PATH (wherever SLURM is or is not installed)."""
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    proc = cli(tmp_path, "hydra/launcher=slurm", "stage=extract", "shard=0,1", "num_shards=2", multirun=True,
               env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "SLURM is not installed on this machine" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "cache").exists()
