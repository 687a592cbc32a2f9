"""ScatterBrain (Chen, Dao, Winsor, Song, Rudra, Ré, NeurIPS 2021, Sec. 3), local variant, registered as ``sblocal``.

The attention matrix A = exp(S Q K^T) is approximated as a sparse + low-rank sum (their eq. 2):

    A ≈ phi(Q) phi(K)^T  +  [A - phi(Q) phi(K)^T]_local,

a Performer low-rank part (FAVOR+ positive orthogonal random features phi, ``common.random_features``) plus, on the
local pattern (blocks of ``local_size`` consecutive positions), the exact entries with the low-rank estimate of
those entries removed, so the local part is counted exactly once. On the local pattern the sum is therefore exact,
off it it is phi(q).phi(k); that is how it is computed here, without forming the difference:

    numerator_i   = sum_{j local to i} e^{s_ij} v_j  +  phi(q_i)^T sum_{j not local to i} phi(k_j) v_j^T,

and the same with v_j = 1 for the normaliser; out = numerator / normaliser. The low-rank sums over the other blocks
are exclusive prefix (and, non-causal, suffix) sums of per-block states (``common.linear_attention.chunk_states``):
no term is obtained by subtracting one large sum from another, so nothing cancels (the subtraction form lost every
digit in float32, issue 17 item 3).

Scaling: the two parts are kept as ``common.partial_sums.PartialSums``, each with its own shift: the exact local
part is max-subtracted by its largest score per query, the low-rank part carries the features' offsets c_q + c_k
(``positive_random_features``); merging rescales to the larger one. Scores up to 1e4 stay finite in every dtype
(with offsets from the features alone, exp(s - c_q - c_k) overflowed even in float64, issue 17 item 2).
Half precision: features, scores, exponentials and both sums are computed in float32, the output cast back.

Positions: queries are the last Nq positions of the key sequence (query i at p_i = i + Nk - Nq,
``common.causal_query_positions``), causal or not; blocks are aligned to key position 0. Causal, query i reads
exactly its own block's keys j <= p_i and every earlier block through the low-rank part, so Nq < Nk (a decoding
step) works. A query at a negative position (non-causal with Nq > Nk) has no local block and reads every key through
the low-rank part.
"""
from __future__ import annotations

import math

import torch

from common.attention import AttentionMethod, causal_mask, causal_query_positions
from common.linear_attention import augment_values, chunk_states
from common.partial_sums import PartialSums, from_logits
from common.random_features import orthogonal_random_matrix, positive_random_features
from common.registry import register
from common.validation import check_int


def local_blocks(x: torch.Tensor, block: int, front: int = 0) -> torch.Tensor:
    """(B, H, N, F) -> (B, H, ceil((front + N)/block), block, F): ``front`` zero rows first, zero-padded at the end."""
    n = front + x.shape[2]
    back = math.ceil(n / block) * block - n
    return torch.nn.functional.pad(x, (0, 0, front, back)).view(*x.shape[:2], -1, block, x.shape[-1])


@register("sblocal")
class ScatterBrainAttention(AttentionMethod):
    """Exact local blocks + FAVOR+ low-rank part elsewhere (module docstring).

    Options: local_size (block length, 64), nb_features (random features, 64), seed. A block covering every key
    (``local_size >= Nk``, :meth:`exact_options`) is exact attention for Nq <= Nk."""

    randomized = True

    def __init__(self, local_size: int = 64, nb_features: int = 64, seed: int | None = None,
                 check_finite: bool = True):
        super().__init__(seed=seed, check_finite=check_finite)
        self.local_size = check_int(local_size, "local_size", "sblocal", minimum=1)
        self.nb_features = check_int(nb_features, "nb_features", "sblocal", minimum=1)

    def attend(self, q, k, v, causal, scale):
        dtype = q.dtype
        work = torch.promote_types(dtype, torch.float32)
        q, k, v = (t.to(work) for t in (q, k, v))
        b, h, nq, d = q.shape
        nk, dv = k.shape[2], v.shape[-1]
        # blocks longer than the sequence are one block either way; min() keeps their padding small
        size = min(self.local_size, nk)
        first = causal_query_positions(nq, nk)[0].item() if nq else 0   # position of query 0
        first_block = first // size                                      # floor: negative if Nq > Nk
        lead = first - first_block * size                                # query 0's slot in its block
        empty_blocks = max(0, -first_block)                              # blocks before key 0 that hold queries

        w = orthogonal_random_matrix(self.nb_features, d, generator=self.generator(q.device), device=q.device,
                                     dtype=work)
        phi_q, c_q = positive_random_features(q, w, scale, offset="row")
        phi_k, c_k = positive_random_features(k, w, scale, offset="global")
        key_front = empty_blocks * size
        kb, vb, fkb = (local_blocks(t, size, key_front) for t in (k, augment_values(v), phi_k))
        qb, fqb = (local_blocks(t, size, lead) for t in (q, phi_q))
        # the key blocks the query blocks sit on: the last ones (the last query is at the last key's position)
        mine = slice(kb.shape[2] - qb.shape[2], None)

        # low-rank part over the blocks that are not local: before (and, non-causal, after) the query's block
        before, _ = chunk_states(fkb, vb)
        low = fqb @ before[:, :, mine]
        if not causal:
            after, _ = chunk_states(fkb, vb, reverse=True)
            low = low + fqb @ after[:, :, mine]
        unblock = lambda t: t.reshape(b, h, -1, t.shape[-1])[:, :, lead:lead + nq]
        low = unblock(low)
        low_rank = PartialSums(low[..., :dv], low[..., dv], (c_q + c_k).squeeze(-1))

        # exact local part: scores of each query block against its own key block, masked, max-subtracted
        scores = qb @ kb[:, :, mine].transpose(-2, -1) * scale
        key_slot = torch.arange(kb.shape[2] * size, device=q.device).view(-1, size)[mine] - key_front
        keep = ((key_slot >= 0) & (key_slot < nk)).unsqueeze(-2)
        if causal:
            keep = keep & causal_mask(size, size, q.device)                 # key slot <= query slot in the block
        local = from_logits(scores.masked_fill(~keep, float("-inf")), vb[:, :, mine][..., :dv],
                            "bhnqk,bhnkv->bhnqv")
        local = local.map_queries(unblock)

        total = low_rank.merge(local)
        out = total.num / total.den.clamp_min(torch.finfo(work).tiny).unsqueeze(-1)
        return out.to(dtype)

    @classmethod
    def exact_options(cls, n_keys):
        """One local block covering every key: exact attention for Nq <= Nk (no low-rank term is left)."""
        return {"local_size": n_keys}

    @classmethod
    def budgets(cls, n_keys):
        root = max(8, 2 ** round(math.log2(math.sqrt(n_keys))))
        return [{"local_size": min(n_keys, f // 2), "nb_features": f} for f in (root, 2 * root, 4 * root)]
