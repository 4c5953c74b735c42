"""The dataset audit: comparisons (``compare``), pixel embeddings for near-duplicates (``pixels``),
snapshots (``snapshot``) and the HTML section (``html``); ``stage=audit`` puts them together. Its
failure exception, ``AuditFailed``, lives in :mod:`pipeline.errors` with the other user-facing ones."""
