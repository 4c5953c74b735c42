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


import torch
from torch import Tensor

from pipeline.errors import PipelineError
from pipeline.methods.blur import gaussian_blur

VARIANTS = ("object_only", "context_only", "mixed_same", "mixed_rand")
FILLS = ("mean", "blur", "constant")


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
        return gaussian_blur(x, float(blur_sigma))
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
