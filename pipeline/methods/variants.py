"""Object / background image variants for the background-reliance test of Xiao et al. (2020),
"Noise or Signal: The Role of Image Backgrounds in Object Recognition".

A classifier that decides from the object keeps its prediction when the background is removed
(``object_only``) and loses it when the object is removed (``context_only``); one that decides
from the background does the opposite. Pasting the object onto the context of another image of
the same class (``mixed_same``) or of another class (``mixed_rand``) measures how much the
background alone moves the prediction. A "context" is an image's ``context_only`` variant (its own
object filled), and the object is pasted where it lies in its own image, so the variants differ
only in the pixels the masks name.

Images are (B,C,H,W) in the model's (normalised) units; object masks are (B,H,W) bool.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

from pipeline.errors import PipelineError

VARIANTS = ("object_only", "context_only", "mixed_same", "mixed_rand")
FILLS = ("mean", "blur", "constant")


def _blur_kernel(sigma: float, size: int) -> int:
    """Odd kernel of about 3 sigma either side, clipped to the largest that reflect padding allows
    on an axis of ``size`` pixels (padding < size, so kernel <= 2 * size - 1)."""
    return min(2 * math.ceil(3 * sigma) + 1, 2 * size - 1)


def fill_image(x: Tensor, fill: str, *, mean: Tensor | None = None, constant: float = 0.0,
               blur_sigma: float = 10.0) -> Tensor:
    """What removed pixels take (B,C,H,W): the dataset ``mean`` colour (C,) in x's units, a heavy
    Gaussian blur of the image itself (keeps the colours, removes the shapes), or ``constant``."""
    if fill == "constant":
        return torch.full_like(x, constant)
    if fill == "mean":
        if mean is None:
            raise PipelineError("fill='mean' needs the dataset mean colour: pass mean=(C,) in the "
                                "images' normalised units, or choose fill='constant' or 'blur'.")
        mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(-1)
        if mean.numel() != x.shape[1]:
            raise PipelineError(f"fill='mean' got a mean of {mean.numel()} values for images with "
                                f"{x.shape[1]} channels; pass one value per channel.")
        return mean.view(1, -1, 1, 1).expand_as(x).clone()
    if fill == "blur":
        if not blur_sigma > 0:
            raise PipelineError(f"blur_sigma must be > 0 for fill='blur', got {blur_sigma}.")
        h, w = x.shape[-2:]
        kernel = [_blur_kernel(blur_sigma, w), _blur_kernel(blur_sigma, h)]  # torchvision: (x, y)
        return gaussian_blur(x, kernel, [float(blur_sigma)] * 2)
    raise PipelineError(f"Unknown fill {fill!r}; choose one of: {', '.join(FILLS)}.")


def _check(x: Tensor, objects: Tensor, *others: Tensor) -> None:
    """Masks must be bool (B,H,W) matching x; other images must have x's shape."""
    b, _, h, w = x.shape
    if objects.dtype != torch.bool or tuple(objects.shape) != (b, h, w):
        raise PipelineError(f"Object masks must be bool of shape {(b, h, w)} for images {tuple(x.shape)}, "
                            f"got {objects.dtype} {tuple(objects.shape)}.")
    for other in others:
        if other.shape != x.shape:
            raise PipelineError(f"Fill/background images must have the images' shape {tuple(x.shape)}, "
                                f"got {tuple(other.shape)}.")


def paste(x: Tensor, objects: Tensor, background: Tensor) -> Tensor:
    """x's object pixels over ``background``, at the place they have in x."""
    _check(x, objects, background)
    return torch.where(objects[:, None], x, background)


def object_only(x: Tensor, objects: Tensor, filled: Tensor) -> Tensor:
    """The object kept, everything outside it taken from ``filled``."""
    return paste(x, objects, filled)


def context_only(x: Tensor, objects: Tensor, filled: Tensor) -> Tensor:
    """The object taken from ``filled``, everything outside it kept."""
    _check(x, objects, filled)
    return torch.where(objects[:, None], filled, x)


def make_variants(x: Tensor, objects: Tensor, filled: Tensor, same_context: Tensor,
                  rand_context: Tensor) -> dict[str, Tensor]:
    """The four variants, keys in :data:`VARIANTS` order. ``same_context`` and ``rand_context``
    are the ``context_only`` variants of each image's partner of the same / another class."""
    return {
        "object_only": object_only(x, objects, filled),
        "context_only": context_only(x, objects, filled),
        "mixed_same": paste(x, objects, same_context),
        "mixed_rand": paste(x, objects, rand_context),
    }
