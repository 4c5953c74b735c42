"""A 1-D walkthrough of what "deconvolution" means, as small functions on 1-D tensors.

The running example: a filter of size f = 4 slides at stride s = 2 over 8 inputs zero-padded by 2
on each side (12 values), giving 5 outputs. That convolution is a 5 x 12 matrix W (one shifted copy
of the filter per row), the "deconvolution" is W^T (``conv_transpose1d``), and W^T can also be
computed by inserting s - 1 zeros between the outputs and convolving with the flipped filter at
stride 1 (the sub-pixel view). Zeiler & Fergus's unpooling is shown with ``max_unpool2d``.

As in PyTorch, "convolution" means cross-correlation: y[i] = sum_k w[k] * x[i * s + k].

Reconstruction: W^T W is the identity only on W's row space. When W's rows are orthonormal
(W W^T = I) then W^T W is the orthogonal projection onto that row space, so x = W^T (W x) holds
exactly for every x in it (and for no x outside it); with 5 rows and 12 columns, W^T cannot undo
W for every x, and for a general filter it does not even reconstruct the row space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.errors import PipelineError


def _check_1d(name: str, t: Tensor) -> None:
    if t.dim() != 1:
        raise PipelineError(f"{name} must be a 1-D tensor, got shape {tuple(t.shape)}")


def pad1d(x: Tensor, padding: int) -> Tensor:
    """Zero-pad a 1-D signal by ``padding`` values at each end."""
    _check_1d("x", x)
    return F.pad(x, (padding, padding))


def output_length(length: int, f: int, stride: int) -> int:
    """Number of positions a size-f filter takes at ``stride`` over ``length`` (padded) values."""
    if length < f:
        raise PipelineError(f"a filter of size {f} does not fit in {length} values")
    return (length - f) // stride + 1


def conv1d_matrix(w: Tensor, length: int, stride: int) -> Tensor:
    """The (m, length) matrix W with row i = the filter placed at column i * stride, so that
    ``W @ x_padded == conv1d(x_padded, w, stride)``; 5 x 12 for f = 4, s = 2, length 12."""
    _check_1d("w", w)
    f = w.numel()
    m = output_length(length, f, stride)
    W = torch.zeros(m, length, dtype=w.dtype)
    for i in range(m):
        W[i, i * stride:i * stride + f] = w
    return W


def conv1d(x: Tensor, w: Tensor, stride: int, padding: int) -> Tensor:
    """PyTorch's ``conv1d`` on 1-D tensors (no channels, no bias)."""
    _check_1d("x", x)
    _check_1d("w", w)
    return F.conv1d(x[None, None], w[None, None], stride=stride, padding=padding)[0, 0]


def conv1d_via_matrix(x: Tensor, w: Tensor, stride: int, padding: int) -> Tensor:
    """The same convolution as a matrix product: W @ pad(x)."""
    xp = pad1d(x, padding)
    return conv1d_matrix(w, xp.numel(), stride) @ xp


def transpose_via_matrix(y: Tensor, w: Tensor, stride: int, padding: int, length: int) -> Tensor:
    """W^T y for the convolution of ``length`` inputs padded by ``padding``, with the padded ends
    cropped off (they correspond to no input)."""
    _check_1d("y", y)
    W = conv1d_matrix(w, length + 2 * padding, stride)
    if W.shape[0] != y.numel():
        raise PipelineError(f"y has {y.numel()} values but the convolution has {W.shape[0]} outputs")
    full = W.T @ y
    return full[padding:full.numel() - padding]


def conv_transpose1d(y: Tensor, w: Tensor, stride: int, padding: int) -> Tensor:
    """PyTorch's ``conv_transpose1d`` on 1-D tensors; its ``padding`` crops the output, undoing the
    forward's padding, which is exactly the cropping in ``transpose_via_matrix``."""
    _check_1d("y", y)
    _check_1d("w", w)
    return F.conv_transpose1d(y[None, None], w[None, None], stride=stride, padding=padding)[0, 0]


def insert_zeros(y: Tensor, stride: int) -> Tensor:
    """Put ``stride - 1`` zeros between consecutive values: m values -> (m - 1) * stride + 1."""
    _check_1d("y", y)
    out = torch.zeros((y.numel() - 1) * stride + 1, dtype=y.dtype)
    out[::stride] = y
    return out


def transpose_via_subpixel(y: Tensor, w: Tensor, stride: int) -> Tensor:
    """W^T y (full, uncropped) as a stride-1 convolution: insert zeros, pad f - 1 zeros at each end,
    then convolve with the flipped filter."""
    f = w.numel()
    z = pad1d(insert_zeros(y, stride), f - 1)
    return conv1d(z, torch.flip(w, dims=[0]), stride=1, padding=0)


def orthonormal_row_filter() -> Tensor:
    """A size-4 filter whose stride-2 matrix has orthonormal rows: (1, 1, 1, -1) / 2.

    Neighbouring rows overlap in two taps, w0*w2 + w1*w3 = 1 - 1 = 0, rows two apart do not
    overlap, and the norm is 1, so W W^T = I.
    """
    return torch.tensor([1.0, 1.0, 1.0, -1.0]) / 2


def max_pool_unpool(x: Tensor, kernel: int) -> tuple[Tensor, Tensor, Tensor]:
    """Max-pool a (B, C, H, W) map with switches, then unpool: (pooled, switches, unpooled).

    ``unpooled`` has each window's max back at its original position (the switch) and zeros
    everywhere else, Zeiler & Fergus's approximate inverse of max-pooling.
    """
    if x.dim() != 4:
        raise PipelineError(f"max_pool_unpool needs a (B, C, H, W) tensor, got {tuple(x.shape)}")
    pooled, switches = F.max_pool2d(x, kernel, return_indices=True)
    unpooled = F.max_unpool2d(pooled, switches, kernel, output_size=x.shape[2:])
    return pooled, switches, unpooled
