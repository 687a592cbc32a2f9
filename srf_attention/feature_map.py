"""The positive random feature map of FAVOR+ (Choromanski et al. 2021, Lemma 1; Reid et al. 2023, eq. 1).

For the softmax kernel K(q, k) = exp(S q.k) and rows w_1..w_m of a random matrix W (``features.py``):

    phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m),     x' = sqrt(S) x,

so that E[phi(q) . phi(k)] = exp(q'.k') = exp(S q.k) whenever each w_i ~ N(0, I_d) marginally (iid, ORF and
SimRF with chi norms all qualify). With S = 1/sqrt(d) the data is scaled by d^(-1/4), as in the papers.

Stabiliser. exp overflows for large |W x'|; so every feature is multiplied by exp(-c) for an offset c:
- queries: c is each query's own max over features (``offset='row'``); the factor is the same for the
  numerator and the denominator of that query and cancels exactly;
- keys: c must be one number shared by all keys a query reads, or the ratio changes. ``offset='global'`` takes
  the max over all keys and features of each (batch, head); recurrent decoding carries that maximum as
  ``key_maxima`` and passes it back as a tensor offset, rescaling its state when a new key exceeds it.
"""
from __future__ import annotations

import math

import torch


def positive_random_features(x: torch.Tensor, projection: torch.Tensor, scale: float,
                             offset: str | torch.Tensor = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """phi(x) * exp(-c) for x of shape (..., N, d) and projection W of shape (m, d); returns (features, c).

    ``offset``: 'row' (c per row, for queries), 'global' (c per leading index over the last two dims, for
    keys) or a tensor broadcastable to (..., 1, 1) (a carried key maximum). Features have shape (..., N, m).
    Computed in float32 at least (bfloat16/float16 inputs are upcast for the exp and cast back).
    """
    if projection.dim() != 2 or projection.shape[1] != x.shape[-1]:
        raise ValueError(f"positive_random_features: projection must have shape (m, {x.shape[-1]}), "
                         f"got {tuple(projection.shape)}")
    work_dtype = torch.promote_types(x.dtype, torch.float32)
    xs = x.to(work_dtype) * math.sqrt(scale)
    w = projection.to(device=x.device, dtype=work_dtype)
    logits = xs @ w.T - 0.5 * (xs * xs).sum(-1, keepdim=True)
    if isinstance(offset, torch.Tensor):
        c = offset.to(work_dtype)
    elif offset == "row":
        c = logits.amax(dim=-1, keepdim=True).detach()
    elif offset == "global":
        c = logits.amax(dim=(-2, -1), keepdim=True).detach()
    else:
        raise ValueError(f"positive_random_features: offset must be 'row', 'global' or a tensor, got {offset!r}")
    feats = torch.exp(logits - c) / math.sqrt(projection.shape[0])
    return feats.to(x.dtype) if x.dtype in (torch.float16, torch.bfloat16) else feats, c
