"""What a run tells the shell and the sweep: exit statuses, one-line messages and ``status.json``.

Exit statuses, so that a cron job can tell a regression from a bug:

* 0 - every stage ran (and the audit, if any, passed);
* 1 - the audit ran and found a regression beyond an ``audit.fail_on`` limit;
* 2 - a user error: bad config, missing input, a stage that cannot run here (one line, the fix);
* 3 - an internal error: one line naming it and the log file, whose end holds the traceback.

Every job writes ``status.json`` (status, exit, message) into its run folder. In a multirun a failed
job does not end the sweep: it records its status and returns, the sweep summary lists every job
with its status and message, and the sweep exits with the highest status of its jobs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline.cache import atomic_write_json
from pipeline.errors import AuditFailed, PipelineError

log = logging.getLogger("pipeline")
STATUS_FILE = "status.json"
OK, AUDIT_FAILED, USER_ERROR, INTERNAL_ERROR = 0, 1, 2, 3
STATUS = {OK: "ok", AUDIT_FAILED: "audit failed", USER_ERROR: "error", INTERNAL_ERROR: "internal error"}


@dataclass
class Outcome:
    """How a job ended: its exit status, the one line for stderr ('' when it succeeded) and the
    run summary when the stages got that far."""

    exit: int
    message: str
    summary: dict[str, Any] | None

    @property
    def status(self) -> str:
        return STATUS[self.exit]


def log_file() -> Path | None:
    """The job's log file (Hydra's ``<run dir>/<job name>.log``), None outside a Hydra run."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return Path(hc.runtime.output_dir) / f"{hc.job.name}.log"


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_job(cfg: DictConfig) -> Outcome:
    """Run the configured stages and turn whatever happens into an :class:`Outcome` (never
    raises, except on Ctrl-C); writes ``status.json`` into the run folder."""
    from pipeline.stages import run_stages

    try:
        outcome = Outcome(OK, "", run_stages(cfg))
    except AuditFailed as e:
        outcome = Outcome(AUDIT_FAILED, str(e), e.summary)
    except PipelineError as e:
        outcome = Outcome(USER_ERROR, f"error: {e}", None)
    except Exception as e:  # noqa: BLE001 - an internal error: one line here, the traceback in the log
        log.exception("internal error")
        where = log_file()
        first = str(e).splitlines()[0][:300] if str(e) else ""
        outcome = Outcome(INTERNAL_ERROR, f"internal error: {type(e).__name__}: {first}"
                          + (f" (the traceback is at the end of {where})" if where else ""), None)
    write_status(outcome)
    return outcome


def write_status(outcome: Outcome) -> None:
    """``status.json`` in the job's run folder (when there is one)."""
    if not HydraConfig.initialized():
        return
    folder = Path(HydraConfig.get().runtime.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / STATUS_FILE, {"status": outcome.status, "exit": outcome.exit,
                                             "message": outcome.message})
