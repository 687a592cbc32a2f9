"""Fast gradient estimators of attention from samples of the softmax rows (Haris 2024, Sec. 5).

With s_ij = S q_i . k_j, A_i = softmax(s_i) over P_i, O_i = sum_j A_ij v_j and G_i = dL/dO_i, the exact gradients
(``naive_backprop.py``) are

    dL/ds_ij = A_ij (G_i . v_j - G_i . O_i)
    dV_j = sum_i A_ij G_i
    dQ_i = S E_{j ~ A_i}[(G_i . v_j - G_i . O_i) k_j]
    dK_j = S sum_i A_ij (G_i . v_j - G_i . O_i) q_i.

Each is a sum over rows of an expectation under A_i, so l samples j_1..j_l ~ A_i per query (drawn with lazy
Gumbel sampling, ``softmax_expectation.py``) give unbiased estimates at O(n l d) cost:

    dV_{j_s} += G_i / l,   dQ_i = (S / l) sum_s c_is k_{j_s},   dK_{j_s} += (S / l) c_is q_i,
    with c_is = G_i . v_{j_s} - G_i . O_i.

(Unbiased given the exact O_i; with an approximate forward, O_i is the forward's estimate.)

dV = A^T G is a product with the transpose of a stochastic matrix, which the paper estimates with one-step random
walks instead (``dv_estimator='walk'``, ``random_walk.transpose_walk_estimate``): per column c of G, start at
query i with probability proportional to G_ic + sigma_c >= 0, step j ~ A_i by lazy Gumbel sampling, histogram the
endpoints, subtract sigma_c A^T 1 (estimated from uniform starts). It is unbiased for signed G; its variance
against the scatter estimator is measured in ``tests/knn_attention/test_gradients.py`` and the README. dK does not
reduce to one such product: its weight G_i . v_j - G_i . O_i depends on both ends of the step, so P^T would have to
act on the d Dv entries of q_i G_i^T; dK keeps the scatter estimator.
"""
from __future__ import annotations

import torch

from common.attention import gather_rows

from .random_walk import transpose_walk_estimate


def _scatter_rows(shape, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """zeros(shape) with rows (B, H, Nq, l, D) added at key positions index (B, H, Nq, l)."""
    b, h = index.shape[:2]
    out = torch.zeros(shape, dtype=rows.dtype, device=rows.device)
    flat = index.reshape(b, h, -1, 1).expand(-1, -1, -1, rows.shape[-1])
    return out.scatter_add_(2, flat, rows.reshape(b, h, -1, rows.shape[-1]))


def sampled_gradients(q, k, v, out, grad_out, samples, scale: float):
    """(dQ, dK, dV) estimated from ``samples`` (B, H, Nq, l) of each row's softmax (the formulas above)."""
    num = samples.shape[-1]
    k_s, v_s = gather_rows(k, samples), gather_rows(v, samples)
    c = torch.einsum("bhqe,bhqse->bhqs", grad_out, v_s) - (grad_out * out).sum(-1, keepdim=True)
    coef = c * (scale / num)
    dq = torch.einsum("bhqs,bhqsd->bhqd", coef, k_s)
    dk = _scatter_rows(k.shape, samples, coef.unsqueeze(-1) * q.unsqueeze(3))
    dv = _scatter_rows(v.shape, samples, (grad_out / num).unsqueeze(3).expand(*samples.shape, v.shape[-1]))
    return dq, dk, dv


class SampledGradientAttention(torch.autograd.Function):
    """Attention whose forward is any estimator and whose backward is :func:`sampled_gradients`.

    ``forward_fn(q, k, v) -> out`` computes the forward; ``sample_fn(q, k, rows=None) -> samples`` draws l samples
    of every row's softmax at backward time (fresh randomness, independent of the forward's), or, given ``rows``
    (B, H, R), one sample of each listed row. ``dv_walks``: None for the scatter estimator of dV, else the number
    of random walks per column of G (module docstring), drawn with ``generator``.
    """

    @staticmethod
    def forward(ctx, q, k, v, forward_fn, sample_fn, scale, dv_walks=None, generator=None):
        out = forward_fn(q, k, v)
        ctx.save_for_backward(q, k, v, out)
        ctx.sample_fn, ctx.scale, ctx.dv_walks, ctx.generator = sample_fn, scale, dv_walks, generator
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out = ctx.saved_tensors
        samples = ctx.sample_fn(q, k)
        dq, dk, dv = sampled_gradients(q, k, v, out, grad_out, samples, ctx.scale)
        if ctx.dv_walks is not None:
            dv = transpose_walk_estimate(lambda rows, gen: ctx.sample_fn(q, k, rows).squeeze(-1), grad_out,
                                         k.shape[2], ctx.dv_walks, ctx.generator).to(v.dtype)
        return dq, dk, dv, None, None, None, None, None
