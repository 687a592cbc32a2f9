"""The seed repository's entry point for simplex random features (srf-attention's ``rfs.py``), kept so that its
README's usage ``from srf_attention import FastAttention, simplex_random_matrix`` works as written.

It is an adapter with the seed's argument names over ``common.random_features.simplex_random_matrix`` (Reid et al.
2023, Sec. 3), where the projections live; new code should call that one.
"""
from __future__ import annotations

import torch

from common.random_features import simplex_random_matrix as _simplex_random_matrix


def simplex_random_matrix(nb_rows: int, nb_features: int | None = None, normalize: bool = False, device=None,
                          generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SimRF projection of shape (nb_features, nb_rows): ``nb_rows`` is the head dimension d and ``nb_features``
    the number of features m (default d), as in the seed's README call ``simplex_random_matrix(nb_rows=D,
    nb_features=D, normalize=False, device=device)``; ``normalize=True`` scales every row to unit length (the
    seed's option; the kernel estimate is then no longer unbiased)."""
    w = _simplex_random_matrix(nb_rows if nb_features is None else nb_features, nb_rows, generator=generator,
                               dtype=dtype, device="cpu" if device is None else device)
    return w / w.norm(dim=-1, keepdim=True) if normalize else w
