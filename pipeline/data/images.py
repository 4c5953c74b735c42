"""Reading image files safely: ids from bytes, validation with reasons, and mode conversion to RGB.

Every file is decoded once at scan time so that unreadable, truncated, empty, non-image and
decompression-bomb files are quarantined with a reason instead of failing a run later.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class ScanResult:
    """Outcome of reading one file: its id when good, else the reason it was rejected."""

    path: str
    image_id: str | None
    width: int | None
    height: int | None
    reason: str | None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: EXIF rotation applied, alpha composited over white,
    16-bit and float images rescaled to their range, palette and CMYK converted by PIL."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 65535.0
        else:
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def decode(data: bytes) -> Image.Image:
    """Decode bytes fully into an RGB image; decompression-bomb warnings are raised as errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        img.load()
        return to_rgb(img)


def load_image(path: str | Path) -> Image.Image:
    """Read an image file as RGB (the file was validated at scan time)."""
    return decode(Path(path).read_bytes())


def images_to_tensor(paths: list[str], transform: Any) -> torch.Tensor:
    """Load and preprocess images into one (N,C,H,W) tensor."""
    return torch.stack([transform(load_image(p)) for p in paths])


def scan_file(path: str | Path) -> ScanResult:
    """Hash and fully decode one file, returning its id or why it is unusable."""
    p = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return ScanResult(p, None, None, None, f"unreadable: {e.strerror or e}")
    if not data:
        return ScanResult(p, None, None, None, "empty file (0 bytes)")
    try:
        img = decode(data)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return ScanResult(p, None, None, None, f"over PIL's decompression-bomb limit: {e}")
    except UnidentifiedImageError:
        return ScanResult(p, None, None, None, "not an image (PIL cannot identify it)")
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e)
        kind = "truncated" if "truncated" in msg.lower() or "end of file" in msg.lower() else "corrupt"
        return ScanResult(p, None, None, None, f"{kind} image: {msg}")
    return ScanResult(p, hashlib.sha256(data).hexdigest(), img.width, img.height, None)
