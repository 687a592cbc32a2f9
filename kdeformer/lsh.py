"""Angular locality-sensitive hashing with Gray-code bucket order (Zandieh et al. 2023, Sec. 4.1; Charikar 2002).

r random Gaussian directions w_1..w_r give each vector x the r sign bits b_t = [w_t . x > 0]; two vectors share a
bit with probability 1 - angle(x, y) / pi, so similar directions land in the same bucket (the integer whose
binary digits are the bits). KDEformer orders the 2^r buckets along a Gray code, in which neighbouring positions
differ in exactly one bit, so that nearby buckets in the order are also nearby in angle; sorting queries and keys
by that position puts similar vectors into the same block.
"""
from __future__ import annotations

import torch


def gray_code(i: torch.Tensor) -> torch.Tensor:
    """The i-th Gray code g(i) = i xor (i >> 1): g(i) and g(i + 1) differ in exactly one bit."""
    return i ^ (i >> 1)


def gray_rank(code: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`gray_code`: the position of ``code`` in the Gray order (prefix xor of its bits)."""
    rank = code.clone()
    shift = 1
    while shift < bits:
        rank ^= rank >> shift
        shift *= 2
    return rank


def random_projections(head_dim: int, num_bits: int, generator: torch.Generator, dtype, device) -> torch.Tensor:
    """(head_dim, num_bits) Gaussian hyperplane normals of SimHash."""
    return torch.randn(head_dim, num_bits, generator=generator, dtype=dtype, device=device)


def bucket_positions(x: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    """Gray-order position of each vector's SimHash bucket: x (..., N, d) -> (..., N) long in [0, 2^r).

    The products are taken in the dtype of ``projections`` (KDEformer draws them in float32 for half-precision
    inputs), so that a bfloat16 / float16 input hashes as its float32 value does."""
    bits = (x.to(projections.dtype) @ projections > 0).long()
    weights = 2 ** torch.arange(projections.shape[1], device=x.device)
    return gray_rank((bits * weights).sum(-1), projections.shape[1])


def sort_by_bucket(x: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    """Permutation (..., N) that sorts vectors by Gray-order bucket (stable: ties keep sequence order)."""
    return torch.sort(bucket_positions(x, projections), dim=-1, stable=True).indices
