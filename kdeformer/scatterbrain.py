"""ScatterBrain (Chen, Dao, Winsor, Song, Rudra, Ré, NeurIPS 2021, Sec. 3), local variant, registered as ``sblocal``.

The attention matrix A = exp(S Q K^T) is approximated as a sparse + low-rank sum (their eq. 2):

    A ≈ phi(Q) phi(K)^T  +  [A - phi(Q) phi(K)^T]_local,

a Performer low-rank part (FAVOR+ positive orthogonal random features phi, ``srf_attention.feature_map``) plus,
on the local pattern (blocks of ``local_size`` consecutive positions), the exact entries with the low-rank
estimate of those entries removed, so the local part is counted exactly once. Both terms multiply [V, 1], which
gives the numerator and the normaliser; out = numerator / normaliser.

Scaling: phi carries a per-query and a shared key offset (exp(-c_q - c_k), see feature_map.py); the exact local
entries are multiplied by the same factor so both parts share one scale, in float64 to keep the exponent safe.
Causal: the low-rank part uses prefix sums (``common.linear_attention``), the local blocks a causal mask.
"""
from __future__ import annotations

import math

import torch

from common.attention import AttentionMethod
from common.linear_attention import linear_attention_sums
from common.registry import register
from common.validation import check_int
from srf_attention.feature_map import positive_random_features
from srf_attention.features import orthogonal_random_matrix


def local_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, N, F) -> (B, H, ceil(N/block), block, F), zero-padded at the end."""
    n = x.shape[2]
    pad = math.ceil(n / block) * block - n
    return torch.nn.functional.pad(x, (0, 0, 0, pad)).view(*x.shape[:2], -1, block, x.shape[-1])


@register("sblocal")
class ScatterBrainAttention(AttentionMethod):
    """Local exact blocks + FAVOR+ low-rank part with the overlap removed (module docstring).

    Options: local_size (block length, 64), nb_features (random features, 64), seed. Needs Nq == Nk (the local
    pattern is defined on positions of one sequence)."""

    randomized = True

    def __init__(self, local_size: int = 64, nb_features: int = 64, seed: int | None = None,
                 check_finite: bool = True):
        super().__init__(seed=seed, check_finite=check_finite)
        self.local_size = check_int(local_size, "local_size", "sblocal", minimum=1)
        self.nb_features = check_int(nb_features, "nb_features", "sblocal", minimum=1)

    def attend(self, q, k, v, causal, scale):
        b, h, n, d = q.shape
        if k.shape[2] != n:
            raise ValueError(f"sblocal: needs Nq == Nk (local blocks are positions of one sequence), "
                             f"got Nq={n}, Nk={k.shape[2]}")
        w = orthogonal_random_matrix(self.nb_features, d, generator=self.generator(q.device), device=q.device)
        phi_q, c_q = positive_random_features(q, w, scale, offset="row")
        phi_k, c_k = positive_random_features(k, w, scale, offset="global")
        low_num, low_den = linear_attention_sums(phi_q, phi_k, v, causal)
        # local blocks, in float64: exact exp(s - c_q - c_k) minus the low-rank estimate of the same entries
        wide = torch.float64
        qb, kb, vb = (local_blocks(t.to(wide), self.local_size) for t in (q, k, v))
        fqb, fkb = local_blocks(phi_q.to(wide), self.local_size), local_blocks(phi_k.to(wide), self.local_size)
        cqb = local_blocks(c_q.to(wide), self.local_size)
        exact = torch.exp(torch.einsum("bhnqd,bhnkd->bhnqk", qb, kb) * scale - cqb - c_k.to(wide).unsqueeze(2))
        correction = exact - torch.einsum("bhnqm,bhnkm->bhnqk", fqb, fkb)
        positions = torch.arange(correction.shape[2] * self.local_size, device=q.device).view(-1, self.local_size)
        valid = positions < n
        keep = valid.unsqueeze(-1) & valid.unsqueeze(-2)
        if causal:
            keep = keep & torch.tril(torch.ones(self.local_size, self.local_size, dtype=torch.bool, device=q.device))
        correction = correction * keep
        local_num = torch.einsum("bhnqk,bhnkv->bhnqv", correction, vb).reshape(b, h, -1, v.shape[-1])[:, :, :n]
        local_den = correction.sum(-1).reshape(b, h, -1)[:, :, :n]
        num = low_num.to(wide) + local_num
        den = low_den.to(wide) + local_den
        return (num / den.unsqueeze(-1)).to(q.dtype)

    @classmethod
    def budgets(cls, n_keys):
        root = max(8, 2 ** round(math.log2(math.sqrt(n_keys))))
        return [{"local_size": min(n_keys, f // 2), "nb_features": f} for f in (root, 2 * root, 4 * root)]
