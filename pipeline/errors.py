"""The exceptions a user sees: mistakes a user can fix (bad path, unknown name, out-of-range value)
and an audit that found a regression.

The entry point prints a PipelineError's message as a single line and exits with status 2 (1 for
AuditFailed), instead of a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class PipelineError(Exception):
    """A user-facing error: the message names the problem and the fix."""


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


def suggest(name: str, choices: Iterable[str], n: int = 5) -> str:
    """Return ' Did you mean: a, b?' for the closest choices to ``name``, or '' when none is close."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not close:
        close = [c for c in choices if name.lower() in c.lower()][:n]
    return f" Did you mean: {', '.join(close)}?" if close else ""
