"""The dataset audit: comparisons (``compare``), pixel embeddings for near-duplicates (``pixels``),
snapshots (``snapshot``) and the HTML section (``html``); ``stage=audit`` puts them together."""

from __future__ import annotations

from typing import Any

from pipeline.errors import PipelineError


class AuditFailed(PipelineError):
    """An audit found a regression beyond a configured limit (``audit.fail_on``).

    Raised after the audit's files and snapshot are written; the entry point maps it to exit
    status 1 (a PipelineError, so without that mapping it still ends the run with a non-zero status).
    ``result`` is the stage's summary entry, for a runner that records it before re-raising.
    """

    def __init__(self, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.result = result or {}
        self.summary: dict[str, Any] | None = None   # the whole run's summary, set by the stage runner


__all__ = ["AuditFailed"]
