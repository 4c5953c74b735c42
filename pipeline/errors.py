"""The one exception type for mistakes a user can fix (bad path, unknown name, out-of-range value).

The entry point prints its message as a single line and exits with status 2, instead of a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PipelineError(Exception):
    """A user-facing error: the message names the problem and the fix."""


def suggest(name: str, choices: Iterable[str], n: int = 5) -> str:
    """Return ' Did you mean: a, b?' for the closest choices to ``name``, or '' when none is close."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not close:
        close = [c for c in choices if name.lower() in c.lower()][:n]
    return f" Did you mean: {', '.join(close)}?" if close else ""
