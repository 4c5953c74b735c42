"""SLURM sweeps (``-m hydra/launcher=slurm``): checks before anything is submitted, a quiet log.

:class:`SlurmCheck` is a Hydra callback (enabled in ``conf/config.yaml``); when a multirun starts
with the submitit SLURM launcher it checks, before any job is submitted, that SLURM is installed
here, that the partition exists and that one of its nodes can hold a job of the size asked for
(a job larger than every node would wait in the queue forever); each problem is one line naming
the fix, and the sweep exits with status 2. It also gives submitit a job-state poller that works
on clusters without job accounting (:class:`QueueWatcher`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

from pipeline.errors import PipelineError



class QueueWatcher(SlurmInfoWatcher):
    """submitit's job-state poller, quiet where the cluster keeps no job accounting.

    submitit asks ``sacct``; without accounting (small clusters) that fails on every poll, printing
    "Slurm accounting storage is disabled" and a "Bypassing sacct error" warning, and a job that
    died without a result file (``scancel``, a node failure) is never seen to end, so the sweep
    waits forever. Here ``sacct``'s errors are captured, and without accounting the states come
    from ``squeue``: a job that has left the queue has ended (its result file, or its absence,
    then says how)."""

    def update(self) -> None:
        command = self._make_command()
        if command is None:
            return
        self._num_calls += 1
        proc = subprocess.run(command, capture_output=True, timeout=60)
        if proc.returncode == 0:
            self._info_dict.update(self.read_info(proc.stdout))
        else:
            self._info_dict.update(self.from_queue())
        self._last_status_check = time.time()
        for job_id in self._registered - self._finished:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)

    def from_queue(self) -> dict[str, dict[str, str]]:
        """States of the registered jobs from ``squeue`` (array tasks one by one); "ENDED" for a job
        no longer in the queue."""
        waiting = sorted(self._registered - self._finished)
        arrays = sorted({j.split("_")[0] for j in waiting})
        proc = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", *[a for j in arrays for a in ("-j", j)]],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
            return {}                        # squeue itself failed: keep the last known states
        queued = dict(line.split("|", 1) for line in proc.stdout.splitlines() if "|" in line)
        return {j: {"JobID": j, "State": queued.get(j, "ENDED"), "NodeList": ""} for j in waiting}


def run(cmd: list[str]) -> str:
    """A SLURM command's output; a PipelineError with its message when it fails."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout
    except subprocess.CalledProcessError as e:
        raise PipelineError(f"`{' '.join(cmd)}` failed: {(e.stderr or e.stdout).strip().splitlines()[-1:]}; "
                            "is slurmctld running (scripts/local_slurm.sh starts a local one)?") from None
    except subprocess.TimeoutExpired:
        raise PipelineError(f"`{' '.join(cmd)}` did not answer in 30 s: is slurmctld running?") from None


def check_slurm(launcher: Any) -> None:
    """Raise a PipelineError (one line, the fix) when a sweep with this launcher config cannot run."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        raise PipelineError("hydra/launcher=slurm, but SLURM is not installed on this machine (no sbatch/sinfo "
                            "on PATH): run the sweep on the cluster's login node, or here with "
                            "hydra/launcher=local_joblib (scripts/local_slurm.sh starts a one-node SLURM "
                            "cluster on Debian).")
    partitions = {line.strip().rstrip("*") for line in run(["sinfo", "-h", "-o", "%P"]).splitlines() if line.strip()}
    partition = launcher.get("partition")
    if partition is not None and str(partition) not in partitions:
        raise PipelineError(f"hydra.launcher.partition={partition} does not exist on this cluster; partitions: "
                            f"{', '.join(sorted(partitions)) or 'none'}.")
    where = ["-p", str(partition)] if partition is not None else []
    nodes = [line.split() for line in run(["sinfo", "-h", "-N", *where, "-o", "%c %m"]).splitlines() if line.strip()]
    cpus = int(launcher.get("cpus_per_task") or 1) * int(launcher.get("tasks_per_node") or 1)
    mem_mb = int(float(launcher.get("mem_gb") or 0) * 1024)
    fits = [n for n in nodes if len(n) == 2 and int(n[0]) >= cpus and int(n[1].rstrip("+")) >= mem_mb]
    if nodes and not fits:
        biggest = max(nodes, key=lambda n: (int(n[0]), int(n[1].rstrip("+"))))
        raise PipelineError(f"no node of partition {partition or '(default)'} can run a job with {cpus} CPUs and "
                            f"{mem_mb} MB (the largest has {biggest[0]} CPUs and {biggest[1]} MB): lower "
                            "hydra.launcher.cpus_per_task / hydra.launcher.mem_gb.")


class SlurmCheck(Callback):
    """Before a SLURM sweep submits anything: SLURM present, partition known, job size possible."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = config.hydra.launcher
        if "SlurmLauncher" not in str(launcher.get("_target_", "")):
            return
        SlurmJob.watcher = QueueWatcher(delay_s=60)
        try:
            check_slurm(launcher)
        except PipelineError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
