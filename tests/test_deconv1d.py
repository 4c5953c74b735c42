"""The 1-D deconvolution walkthrough: every claim checked numerically on the f=4, s=2, 8+2*2 case."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.methods import deconv1d as d

F_SIZE, STRIDE, PAD, N = 4, 2, 2, 8


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_matrix_shape_and_rows() -> None:
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    W = d.conv1d_matrix(w, N + 2 * PAD, STRIDE)
    assert W.shape == (5, 12)
    for i in range(5):
        expected = torch.zeros(12)
        expected[2 * i:2 * i + 4] = w
        assert torch.equal(W[i], expected)


def test_conv_equals_matrix_product(gen: torch.Generator) -> None:
    w, x = torch.randn(F_SIZE, generator=gen), torch.randn(N, generator=gen)
    y = d.conv1d(x, w, STRIDE, PAD)
    assert y.shape == (5,)
    assert torch.allclose(y, d.conv1d_via_matrix(x, w, STRIDE, PAD), atol=1e-6)
    assert torch.allclose(y, d.conv1d_matrix(w, 12, STRIDE) @ d.pad1d(x, PAD), atol=1e-6)


def test_orthonormal_rows_reconstruct_the_row_space(gen: torch.Generator) -> None:
    w = d.orthonormal_row_filter()
    W = d.conv1d_matrix(w, 12, STRIDE)
    assert torch.allclose(W @ W.T, torch.eye(5), atol=1e-6)
    # x in W's row space: W^T (W x) gives x back exactly.
    x = W.T @ torch.randn(5, generator=gen)
    assert torch.allclose(W.T @ (W @ x), x, atol=1e-6)
    # W^T W is then the orthogonal projector onto the row space (symmetric, idempotent, rank 5) ...
    P = W.T @ W
    assert torch.allclose(P @ P, P, atol=1e-6) and torch.allclose(P, P.T)
    assert torch.linalg.matrix_rank(P) == 5
    # ... so a general 12-vector is not reconstructed.
    x_any = torch.randn(12, generator=gen)
    assert (W.T @ (W @ x_any) - x_any).abs().max() > 0.1


def test_general_filter_does_not_reconstruct(gen: torch.Generator) -> None:
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    W = d.conv1d_matrix(w, 12, STRIDE)
    assert not torch.allclose(W @ W.T, torch.eye(5))
    x = W.T @ torch.randn(5, generator=gen)  # even inside the row space
    assert (W.T @ (W @ x) - x).abs().max() > 0.1


def test_transpose_matrix_equals_conv_transpose(gen: torch.Generator) -> None:
    w, y = torch.randn(F_SIZE, generator=gen), torch.randn(5, generator=gen)
    full = d.conv1d_matrix(w, 12, STRIDE).T @ y
    assert torch.allclose(full, d.conv_transpose1d(y, w, STRIDE, padding=0), atol=1e-6)
    cropped = d.transpose_via_matrix(y, w, STRIDE, PAD, N)
    assert cropped.shape == (N,)
    assert torch.allclose(cropped, full[PAD:-PAD])
    assert torch.allclose(cropped, d.conv_transpose1d(y, w, STRIDE, padding=PAD), atol=1e-6)


def test_conv_transpose_is_the_gradient_of_conv(gen: torch.Generator) -> None:
    w, x, y = (torch.randn(n, generator=gen) for n in (F_SIZE, N, 5))
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(d.conv1d(x, w, STRIDE, PAD), x, grad_outputs=y)
    assert torch.allclose(grad, d.transpose_via_matrix(y, w, STRIDE, PAD, N), atol=1e-6)


def test_subpixel_trick(gen: torch.Generator) -> None:
    w, y = torch.randn(F_SIZE, generator=gen), torch.randn(5, generator=gen)
    z = d.insert_zeros(y, STRIDE)
    assert z.tolist() == [y[0], 0, y[1], 0, y[2], 0, y[3], 0, y[4]]
    sub = d.transpose_via_subpixel(y, w, STRIDE)
    assert sub.shape == (12,)
    assert torch.allclose(sub, d.conv1d_matrix(w, 12, STRIDE).T @ y, atol=1e-6)
    assert torch.allclose(sub, d.conv_transpose1d(y, w, STRIDE, 0), atol=1e-6)


def test_unpooling_puts_max_at_switch(gen: torch.Generator) -> None:
    x = torch.randn(2, 3, 6, 8, generator=gen)
    pooled, switches, unpooled = d.max_pool_unpool(x, 2)
    assert pooled.shape == (2, 3, 3, 4) and unpooled.shape == x.shape
    flat_x, flat_u = x.flatten(2), unpooled.flatten(2)
    kept = torch.zeros_like(flat_u, dtype=torch.bool).scatter_(2, switches.flatten(2), True)
    assert torch.equal(flat_u[kept], flat_x[kept])        # each max back at its switch
    assert torch.equal(flat_u[~kept], torch.zeros_like(flat_u[~kept]))  # zeros elsewhere
    assert int(kept.sum()) == pooled.numel()
    # every window has exactly one nonzero, and it is the window's maximum
    windows = unpooled.unfold(2, 2, 2).unfold(3, 2, 2)
    assert torch.equal((windows != 0).sum((-1, -2)), torch.ones_like(pooled, dtype=torch.long))
    assert torch.equal(windows.sum((-1, -2)), pooled)


def test_errors() -> None:
    with pytest.raises(PipelineError, match="1-D"):
        d.conv1d_matrix(torch.ones(2, 2), 12, 2)
    with pytest.raises(PipelineError, match="does not fit"):
        d.conv1d_matrix(torch.ones(4), 3, 2)
    with pytest.raises(PipelineError, match="outputs"):
        d.transpose_via_matrix(torch.ones(4), torch.ones(4), 2, 2, 8)
