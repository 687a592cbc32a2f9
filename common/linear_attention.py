"""Linear attention with a feature map: out_i = phi(q_i)^T sum_j phi(k_j) v_j^T / phi(q_i)^T sum_j phi(k_j)
(Katharopoulos et al. 2020, eq. 4-6), the engine of every random-feature method (Performer, ScatterBrain's low-rank
part). Non-causal it is one (m x Dv) product; causal it needs prefix sums, computed chunkwise: keys before the
current chunk are summarised in an (m x Dv) state, keys inside it are handled by a small masked product, so memory
is O(L m + C^2) and an L x m x Dv cumulative tensor is never built.
"""
from __future__ import annotations

import torch


def linear_attention_sums(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, causal: bool,
                          chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(numerator (B, H, Nq, Dv), denominator (B, H, Nq)) of linear attention.

    phi_q: (B, H, Nq, m), phi_k: (B, H, Nk, m), v: (B, H, Nk, Dv). Causal follows the repository's convention
    (query i reads keys j <= i + Nk - Nq).
    """
    if not causal:
        kv = torch.einsum("bhkm,bhkv->bhmv", phi_k, v)
        return torch.einsum("bhqm,bhmv->bhqv", phi_q, kv), torch.einsum("bhqm,bhm->bhq", phi_q, phi_k.sum(2))
    nq, nk = phi_q.shape[2], phi_k.shape[2]
    offset = nk - nq
    state_kv = torch.einsum("bhkm,bhkv->bhmv", phi_k[:, :, :offset], v[:, :, :offset])
    state_k = phi_k[:, :, :offset].sum(2)
    nums, dens = [], []
    for start in range(0, nq, chunk):
        stop = min(start + chunk, nq)
        fq = phi_q[:, :, start:stop]
        fk, vc = phi_k[:, :, offset + start:offset + stop], v[:, :, offset + start:offset + stop]
        within = torch.tril(fq @ fk.transpose(-1, -2))  # query i reads chunk keys up to its own position
        nums.append(torch.einsum("bhqm,bhmv->bhqv", fq, state_kv) + within @ vc)
        dens.append(torch.einsum("bhqm,bhm->bhq", fq, state_k) + within.sum(-1))
        state_kv = state_kv + torch.einsum("bhkm,bhkv->bhmv", fk, vc)
        state_k = state_k + fk.sum(2)
    return torch.cat(nums, 2), torch.cat(dens, 2)
