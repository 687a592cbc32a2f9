"""Attention computed the plain quadratic way: the reference of this folder (Haris 2024, eq. 1).

    o_i = sum_j softmax(s_i)_j v_j,   s_ij = S q_i . k_j   (j restricted to j <= i + Nk - Nq when causal).

Two forms: one query at a time (the textbook loop, O(Nk) memory per query) and vectorised (all scores at once),
which is ``common.softmax_attention``.
"""
from __future__ import annotations

import torch

from common.attention import allowed_key_counts, softmax_attention
from common.validation import check_qkv, resolve_scale


def naive_attention_loop(q, k, v, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Softmax attention one query at a time: for each (b, h, i), scores, softmax over the allowed keys, sum."""
    check_qkv(q, k, v, causal=causal, scale=scale, method="naive_attention_loop")
    scale = resolve_scale(scale, q.shape[-1])
    counts = allowed_key_counts(q.shape[2], k.shape[2], causal)
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                n_i = int(counts[i])
                weights = torch.softmax(scale * (k[b, h, :n_i] @ q[b, h, i]), dim=0)
                out[b, h, i] = weights @ v[b, h, :n_i]
    return out


naive_attention = softmax_attention  # the vectorised form is common's reference
