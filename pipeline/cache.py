"""Content-addressed outputs: a key names a folder that holds ``manifest.json`` once complete.

A key is the sha256 of canonical JSON of what is computed, its result-changing parameters and the
keys of its inputs. Results are written into a temporary folder beside the target, the manifest is
written last, and the folder is moved into place with ``os.replace``: a folder without a manifest
is never a result, and it is removed and recomputed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal content gives equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def make_key(**parts: Any) -> str:
    """sha256 hex digest of the canonical JSON of ``parts``."""
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The folder's manifest, or None when the folder is not a complete result."""
    p = Path(folder) / MANIFEST
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


class Cache:
    """A root folder of content-addressed entries, with hit/miss counts for the run summary."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.hits: dict[str, int] = {}
        self.misses: dict[str, int] = {}

    def path(self, kind: str, key: str, fanout: bool = False) -> Path:
        """Folder of an entry; ``fanout`` adds a ``key[:2]`` level for kinds with many entries."""
        return self.root / kind / key[:2] / key if fanout else self.root / kind / key

    def get(self, kind: str, key: str, fanout: bool = False) -> Path | None:
        """The entry's folder when it is complete (has a manifest), counting a hit or a miss."""
        p = self.path(kind, key, fanout)
        if read_manifest(p) is not None:
            self.hits[kind] = self.hits.get(kind, 0) + 1
            return p
        self.misses[kind] = self.misses.get(kind, 0) + 1
        return None

    @contextlib.contextmanager
    def write(self, kind: str, key: str, manifest: dict[str, Any] | None = None,
              fanout: bool = False) -> Iterator[Path]:
        """Yield a temporary folder to fill; on success write the manifest last and move it into place.

        On an exception the temporary folder is removed and nothing is published.
        """
        final = self.path(kind, key, fanout)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key[:16]}.", suffix=".tmp"))
        try:
            yield tmp
            info = {"key": key, "kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            info.update(manifest or {})
            atomic_write_json(tmp / MANIFEST, info)
            if final.exists():  # an incomplete leftover, or a concurrent writer that finished first
                if read_manifest(final) is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
                    return
                shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def summary(self) -> dict[str, dict[str, int]]:
        """Hits and misses per kind."""
        kinds = sorted(set(self.hits) | set(self.misses))
        return {k: {"hits": self.hits.get(k, 0), "misses": self.misses.get(k, 0)} for k in kinds}
