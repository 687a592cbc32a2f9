"""Error metrics between an approximation and the exact attention output or matrix.

Every matrix metric is computed per (batch, head) matrix over the last two dimensions and then averaged
over the leading dimensions, which is how the KDEformer and kNN papers report them.
"""
from __future__ import annotations

import math

import torch


def _check_pair(approx: torch.Tensor, exact: torch.Tensor, name: str) -> None:
    if approx.shape != exact.shape:
        raise ValueError(f"{name}: approx and exact must have the same shape, got {tuple(approx.shape)} "
                         f"and {tuple(exact.shape)}")
    if approx.dim() < 2:
        raise ValueError(f"{name}: inputs must be matrices (rank >= 2), got rank {approx.dim()}")


def relative_frobenius_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """mean over matrices of ||approx - exact||_F / ||exact||_F."""
    _check_pair(approx, exact, "relative_frobenius_error")
    diff = torch.linalg.matrix_norm((approx - exact).double(), ord="fro")
    return (diff / torch.linalg.matrix_norm(exact.double(), ord="fro")).mean().item()


def relative_spectral_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """mean over matrices of ||approx - exact||_2 / ||exact||_2, ||.||_2 the operator norm (largest
    singular value). Used for outputs (KDEformer, Sec. 5) and for attention matrices."""
    _check_pair(approx, exact, "relative_spectral_error")
    diff = torch.linalg.matrix_norm((approx - exact).double(), ord=2)
    return (diff / torch.linalg.matrix_norm(exact.double(), ord=2)).mean().item()


def max_abs_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """max_{ij} |approx_ij - exact_ij| over all entries."""
    _check_pair(approx, exact, "max_abs_error")
    return (approx.double() - exact.double()).abs().max().item()


def kl_divergence_rows(exact_weights: torch.Tensor, approx_weights: torch.Tensor, eps: float = 1e-12) -> float:
    """mean over rows i of KL(A_i || Ã_i) = sum_j A_ij log(A_ij / Ã_ij), for row-stochastic A and Ã.

    Terms with A_ij = 0 contribute 0; Ã_ij is floored at ``eps`` so that a missed key gives a large but
    finite penalty.
    """
    _check_pair(approx_weights, exact_weights, "kl_divergence_rows")
    p = exact_weights.double()
    q = approx_weights.double().clamp_min(eps)
    terms = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-300)) - torch.log(q)), torch.zeros_like(p))
    return terms.sum(-1).mean().item()


def perplexity(loss: float) -> float:
    """exp(loss) for a mean cross-entropy ``loss`` in nats per token."""
    if not math.isfinite(loss):
        raise ValueError(f"perplexity: loss must be finite, got {loss}")
    return math.exp(loss)
