"""Cluttered translated digits from scikit-learn's handwritten digits (UCI, 8x8).

Each canvas holds one digit, scaled and placed at a random position, over fragments cut from other
digits (as in cluttered translated MNIST). Train and test canvases draw their digits from disjoint
halves of the source set, so the test split measures generalisation. Generation is a pure function
of its parameters and seed. Each canvas records the digit's box and mask and the boxes of its
fragments (so "fragment" is a concept a unit can be found to detect).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Box = tuple[int, int, int, int]

# bumped when the generated records change (not only the pixels): 2 added fragment boxes
GENERATOR_VERSION = 2
from PIL import Image


@dataclass(frozen=True)
class ClutterParams:
    """What defines a generated dataset; every field changes the images."""

    n_train: int = 5000
    n_test: int = 1000
    canvas: int = 64
    digit_min: int = 20
    digit_max: int = 30
    n_fragments: int = 4
    fragment_size: int = 10
    fragment_intensity: float = 0.8
    seed: int = 0


def _source_digits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """sklearn digits as float images in [0,1], and a deterministic 80/20 train/test split of them."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.float32) / 16.0
    order = np.random.default_rng(seed).permutation(len(images))
    cut = int(0.8 * len(images))
    is_train = np.zeros(len(images), dtype=bool)
    is_train[order[:cut]] = True
    return images, d.target.astype(np.int64), is_train


def _scaled(img8: np.ndarray, size: int) -> np.ndarray:
    """Upscale an 8x8 digit to size x size with bicubic interpolation, clipped to [0,1]."""
    im = Image.fromarray((img8 * 255).astype(np.uint8), "L").resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.float32) / 255.0


def render_canvas(rng: np.random.Generator, digit: np.ndarray, others: np.ndarray,
                  p: ClutterParams) -> tuple[np.ndarray, Box, np.ndarray, list[Box]]:
    """One canvas (float32 in [0,1]), the digit's box (x0, y0, x1, y1) with exclusive ends, its
    mask (bool, the canvas's size: the digit's own strokes), and each fragment's box (the tight box
    of its visible pixels; a fragment cut from an empty corner has none)."""
    c = p.canvas
    canvas = np.zeros((c, c), dtype=np.float32)
    fragment_boxes: list[Box] = []
    for other in others:
        src = _scaled(other, int(rng.integers(p.digit_min, p.digit_max + 1)))
        f = min(p.fragment_size, src.shape[0])
        sy, sx = rng.integers(0, src.shape[0] - f + 1, size=2)
        frag = src[sy:sy + f, sx:sx + f] * p.fragment_intensity
        y, x = rng.integers(0, c - f + 1, size=2)
        canvas[y:y + f, x:x + f] = np.maximum(canvas[y:y + f, x:x + f], frag)
        fy, fx = np.nonzero(frag > 0.1)
        if len(fy):
            fragment_boxes.append((int(x + fx.min()), int(y + fy.min()), int(x + fx.max()) + 1, int(y + fy.max()) + 1))
    size = int(rng.integers(p.digit_min, p.digit_max + 1))
    glyph = _scaled(digit, size)
    y, x = (int(v) for v in rng.integers(0, c - size + 1, size=2))
    canvas[y:y + size, x:x + size] = np.maximum(canvas[y:y + size, x:x + size], glyph)
    ys, xs = np.nonzero(glyph > 0.1)
    box = (x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1)
    mask = np.zeros((c, c), dtype=bool)
    mask[y:y + size, x:x + size] = glyph > 0.1
    return canvas, box, mask, fragment_boxes


def generate(p: ClutterParams) -> list[dict]:
    """All canvases as dicts: split, index, label, box, mask, fragment_boxes and the uint8 image array."""
    images, labels, is_train = _source_digits(p.seed)
    rng = np.random.default_rng(p.seed + 1)
    out: list[dict] = []
    for split, n in (("train", p.n_train), ("test", p.n_test)):
        pool = np.flatnonzero(is_train if split == "train" else ~is_train)
        for i in range(n):
            j = int(pool[rng.integers(len(pool))])
            others = images[rng.choice(np.flatnonzero(labels != labels[j]), size=p.n_fragments)]
            canvas, box, mask, fragments = render_canvas(rng, images[j], others, p)
            out.append({"split": split, "index": i, "label": int(labels[j]), "box": box, "mask": mask,
                        "fragment_boxes": fragments, "pixels": (canvas * 255 + 0.5).astype(np.uint8)})
    return out
