"""The report's files folder: pictures and raw artifacts hard-linked (or copied) beside the page.

Every file gets a generated name (a hash of its source path plus a fixed suffix), so no user string
ever reaches a URL, a source linked twice is stored once, and the page still works when the cache
is deleted (a hard link keeps the bytes) or the run folder is moved.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from PIL import Image

# Formats every browser shows in an <img>; anything else is converted to PNG.
WEB_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp"}
LINK_MODES = ("hardlink", "copy")


class Assets:
    """Files placed under ``folder`` (the page's ``<name>_files`` folder), addressed by relative URL."""

    def __init__(self, folder: Path, url_prefix: str, mode: str = "hardlink") -> None:
        self.folder = folder
        self.url_prefix = url_prefix.rstrip("/")
        self.mode = mode
        self.placed: dict[tuple[str, str], str | None] = {}
        self.made_dirs: set[str] = set()
        self.missing: list[str] = []

    def _target(self, group: str, name: str) -> tuple[str, str]:
        folder = os.path.join(self.folder, group)
        if folder not in self.made_dirs:
            os.makedirs(folder, exist_ok=True)
            self.made_dirs.add(folder)
        return os.path.join(folder, name), f"{self.url_prefix}/{group}/{name}"

    @staticmethod
    def _name(src: str, suffix: str) -> str:
        return hashlib.sha1(src.encode("utf-8", "surrogateescape")).hexdigest()[:20] + suffix

    def file(self, src: str | os.PathLike | None, group: str, suffix: str | None = None) -> str | None:
        """Place ``src`` under ``group`` and return its relative URL; None (and noted in ``missing``)
        when the file does not exist. ``suffix`` names the placed file's ending (default: the source's)."""
        if src is None:
            return None
        src = os.fspath(src)
        suffix = (suffix if suffix is not None else os.path.splitext(src)[1]).lower()
        cache_key = (src, group + suffix)
        if cache_key in self.placed:
            return self.placed[cache_key]
        target, url = self._target(group, self._name(src, suffix))
        try:
            self._place(src, target)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            self.missing.append(src)
            url = None
        self.placed[cache_key] = url
        return url

    def image(self, src: str | os.PathLike | None, group: str, max_side: int = 256) -> str | None:
        """Place a picture for an ``<img>``: web formats as they are, others converted to a PNG of at
        most ``max_side`` pixels. None when the file is missing or unreadable."""
        if src is None:
            return None
        if os.path.splitext(os.fspath(src))[1].lower() in WEB_IMAGE_SUFFIXES:
            return self.file(src, group)
        src = os.fspath(src)
        cache_key = (src, group + ".converted")
        if cache_key not in self.placed:
            target, url = self._target(group, self._name(src, ".png"))
            try:
                with Image.open(src) as im:
                    im = im.convert("RGB")
                    im.thumbnail((max_side, max_side))
                    im.save(target)
            except (OSError, ValueError, Image.DecompressionBombError):
                self.missing.append(src)
                url = None
            self.placed[cache_key] = url
        return self.placed[cache_key]

    def _place(self, src: str, target: str) -> None:
        """Hard-link ``src`` to ``target`` (a copy across file systems or in copy mode)."""
        if self.mode == "hardlink":
            try:
                os.link(src, target)
                return
            except FileExistsError:
                return
            except FileNotFoundError:
                raise
            except OSError:  # another file system, or links not allowed: copy instead
                pass
        if os.path.exists(target):
            return
        if not os.path.isfile(src):
            raise FileNotFoundError(src)
        shutil.copyfile(src, target)
