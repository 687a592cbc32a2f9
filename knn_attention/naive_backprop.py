"""Hand-written gradients of softmax attention w.r.t. Q, K, V (the quadratic formulas; Haris 2024, Sec. 5).

With S the scale, A = softmax(S Q K^T + M) row-wise, O = A V and G = dL/dO:

    dV = A^T G
    dA = G V^T
    dS_ij = A_ij (dA_ij - sum_l A_il dA_il) = A_ij (G_i . v_j - G_i . O_i)     (softmax Jacobian)
    dQ = S dS K,     dK = S dS^T Q.

These are the targets the sampled estimators of ``backward_pass.py`` are unbiased for.
"""
from __future__ import annotations


from common.attention import attention_weights
from common.validation import resolve_scale


def naive_attention_gradients(q, k, v, grad_out, causal: bool = False, scale: float | None = None):
    """(dQ, dK, dV) of L with dL/dO = ``grad_out`` for O = softmax attention(q, k, v)."""
    s = resolve_scale(scale, q.shape[-1])
    a = attention_weights(q, k, causal=causal, scale=s)
    out = a @ v
    d_scores = a * (grad_out @ v.transpose(-1, -2) - (grad_out * out).sum(-1, keepdim=True))
    return s * d_scores @ k, s * d_scores.transpose(-1, -2) @ q, a.transpose(-1, -2) @ grad_out
