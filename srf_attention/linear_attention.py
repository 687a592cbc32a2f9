"""Linear attention from feature maps: the non-causal and the causal (prefix-sum) forms of FAVOR+.

With positive features phi(q_i), phi(k_j) in R^m (``feature_map.py``) the softmax kernel exp(S q.k) is estimated
by phi(q) . phi(k), and attention becomes (Choromanski et al. 2021, "Rethinking Attention with Performers",
Sec. 2, FAVOR+ attention):

    non-causal:  out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / phi(q_i)^T (sum_j phi(k_j)),
    causal:      the same with both sums over j <= i only (prefix sums, Performer's unidirectional case).

Both sums are carried together by appending a column of ones to v ("augmented values"): the last output column
is the denominator. The causal prefix sums are computed chunk by chunk (the chunkwise form of linear attention):
inside a chunk of C positions the masked C x C product phi(Q_c) phi(K_c)^T is used, across chunks one
(m x e) state per chunk, so the memory is O(L*m + L*C + (L/C)*m*e), never an L x m x e cumulative tensor.

A ``state`` (B, H, m, e) = sum_j phi(k_j) [v_j, 1]^T of earlier positions may be passed in; the functions return
the state after the last position, which is what recurrent inference carries (``fast_attention.py``).
"""
from __future__ import annotations

import torch


def augment_values(v: torch.Tensor) -> torch.Tensor:
    """[v, 1]: values with a column of ones, so that one product yields numerator and denominator."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def split_augmented(out: torch.Tensor) -> torch.Tensor:
    """Numerator / denominator of an augmented output (..., Dv + 1) -> (..., Dv).

    The denominator is a sum of positive terms; it can only be zero when every term underflowed (features of
    very large inputs), and then the numerator is zero too: the floor keeps the result finite (zero) there.
    """
    numerator, denominator = out[..., :-1], out[..., -1:]
    return numerator / denominator.clamp_min(torch.finfo(out.dtype).tiny)


def noncausal_linear_attention(qf: torch.Tensor, kf: torch.Tensor, v_aug: torch.Tensor,
                               state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """out = phi(Q) (state + phi(K)^T V_aug); returns (out (B, H, Nq, e), the new state (B, H, m, e))."""
    kv = kf.transpose(-2, -1) @ v_aug
    if state is not None:
        kv = kv + state
    return qf @ kv, kv


def causal_linear_attention(qf: torch.Tensor, kf: torch.Tensor, v_aug: torch.Tensor, chunk_size: int,
                            state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention by chunked prefix sums; query i reads keys j <= i (and ``state``).

    qf, kf: (B, H, L, m); v_aug: (B, H, L, e). Returns (out (B, H, L, e), state after position L (B, H, m, e)).
    """
    b, h, length, m = qf.shape
    e = v_aug.shape[-1]
    chunk_size = min(chunk_size, length)  # a short input (one generated token) is one chunk, not padded
    pad = (-length) % chunk_size
    if pad:  # zero keys add nothing to the sums; the padded queries are dropped below
        qf, kf, v_aug = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (qf, kf, v_aug))
    n = (length + pad) // chunk_size
    qc = qf.reshape(b, h, n, chunk_size, m)
    kc = kf.reshape(b, h, n, chunk_size, m)
    vc = v_aug.reshape(b, h, n, chunk_size, e)

    chunk_kv = kc.transpose(-2, -1) @ vc                            # (B, H, n, m, e): each chunk's own sum
    inclusive = chunk_kv.cumsum(dim=2)                              # sums up to the end of each chunk
    before = torch.cat([torch.zeros_like(chunk_kv[:, :, :1]), inclusive[:, :, :-1]], dim=2)
    final = inclusive[:, :, -1]
    if state is not None:
        before = before + state.unsqueeze(2)
        final = final + state
    inter = qc @ before                                             # keys of earlier chunks
    lower = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=qf.device).tril()
    intra = ((qc @ kc.transpose(-2, -1)) * lower) @ vc              # keys j <= i inside the chunk
    out = (inter + intra).reshape(b, h, n * chunk_size, e)[:, :, :length]
    return out, final
