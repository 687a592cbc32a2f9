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

import functools
import math

import torch

from common.attention import AttentionMethod, causal_mask, causal_query_positions, output_and_lse
from common.linear_attention import augment_values, chunk_states
from common.partial_sums import PartialSums, from_logits
from common.random_features import orthogonal_random_matrix, positive_random_features
from common.registry import register
from common.validation import check_int

BLOCK_BYTES = 2 ** 31  # the features, scores and weights of one group of blocks (``ScatterBrainAttention``)


def local_blocks(x: torch.Tensor, block: int, front: int = 0) -> torch.Tensor:
    """(B, H, N, F) -> (B, H, ceil((front + N)/block), block, F): ``front`` zero rows first, zero-padded at the end."""
    n = front + x.shape[2]
    back = math.ceil(n / block) * block - n
    return torch.nn.functional.pad(x, (0, 0, front, back)).view(*x.shape[:2], -1, block, x.shape[-1])


@register("sblocal")
class ScatterBrainAttention(AttentionMethod):
    """Exact local blocks + FAVOR+ low-rank part elsewhere (module docstring).

    Options: local_size (block length, 64), nb_features (random features, 64), query_block (query rows per group of
    blocks whose features and local scores are formed at once; default None: about :data:`BLOCK_BYTES`, so that
    memory grows like Nk (D + Dv + nb_features Dv / local_size) whatever the budget), seed. A block covering every key
    (``local_size >= Nk``, :meth:`exact_options`) is exact attention for Nq <= Nk."""

    randomized = True
    supports_lse = True

    def __init__(self, local_size: int = 64, nb_features: int = 64, query_block: int | None = None,
                 seed: int | None = None, check_finite: bool = True):
        super().__init__(seed=seed, check_finite=check_finite)
        self.local_size = check_int(local_size, "local_size", "sblocal", minimum=1)
        self.nb_features = check_int(nb_features, "nb_features", "sblocal", minimum=1)
        self.query_block = None if query_block is None else check_int(query_block, "query_block", "sblocal",
                                                                       minimum=1)

    def attend(self, q, k, v, causal, scale):
        total = self._sums(q, k, v, causal, scale)
        return (total.num / total.den.clamp_min(torch.finfo(total.den.dtype).tiny).unsqueeze(-1)).to(q.dtype)

    def attend_lse(self, q, k, v, causal, scale):
        """(out, log of the estimated normaliser: exact local sums + low-rank sums) for ``return_lse=True``."""
        return output_and_lse(self._sums(q, k, v, causal, scale), q.dtype)

    def _sums(self, q, k, v, causal, scale) -> PartialSums:
        """The estimate as sums (in float32 at least): the low-rank part merged with the exact local part."""
        work = torch.promote_types(q.dtype, torch.float32)
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
        key_front = empty_blocks * size
        kb, vb = local_blocks(k, size, key_front), local_blocks(augment_values(v), size, key_front)
        qb = local_blocks(q, size, lead)
        n_kb, n_qb = kb.shape[2], qb.shape[2]
        off = n_kb - n_qb  # query block i sits on key block off + i (the last query is at the last key's position)
        # blocks in groups: a group's features, scores and weights take about BLOCK_BYTES whatever the budget
        step = self.query_block // size if self.query_block else BLOCK_BYTES // (
            b * h * size * (3 * self.nb_features + 4 * size + 2 * (dv + 1)) * q.element_size())
        groups = [(g, min(n_kb, g + max(1, step))) for g in range(0, n_kb, max(1, step))]

        def key_features(g0, g1, offset):
            """FAVOR+ features (B, H, g1 - g0, size, m) of key blocks g0 .. g1 - 1, zero on the padding rows."""
            lo, hi = max(0, g0 * size - key_front), min(nk, g1 * size - key_front)
            if hi <= lo:
                return kb.new_zeros(b, h, g1 - g0, size, self.nb_features), None
            phi, c = positive_random_features(k[:, :, lo:hi], w, scale, offset)
            front = lo + key_front - g0 * size
            phi = torch.nn.functional.pad(phi, (0, 0, front, (g1 - g0) * size - front - (hi - lo)))
            return phi.view(b, h, g1 - g0, size, -1), c

        # the keys' offset c_k (``positive_random_features``' 'global': one per batch element and head). Causal (or
        # one group): the maximum over the keys so far, raised group by group, the features and the state carried so
        # far rescaled to it (one pass over the keys); non-causal with several groups: the maximum over all keys,
        # from a first pass, since the states after a block come from a second pass from the back
        one_pass = causal or len(groups) == 1
        c_k = None if one_pass else functools.reduce(
            torch.maximum, [c for c in (key_features(g0, g1, "global")[1] for g0, g1 in groups) if c is not None])
        after = None
        if not causal:  # the low-rank states of the blocks after each block: a pass from the last group back
            pieces, state = [], None
            for g0, g1 in reversed(groups):
                phi_k = key_features(g0, g1, "global" if c_k is None else c_k)[0]
                later, state = chunk_states(phi_k, vb[:, :, g0:g1], state, reverse=True)
                pieces.append(later)
            after = torch.cat(pieces[::-1], dim=2)
        outputs, state = [], None
        for g0, g1 in groups:
            phi_k, c = key_features(g0, g1, "global" if one_pass else c_k)
            if one_pass and c is not None:
                if c_k is not None:  # both on the larger offset: exp(x - c) = exp(x - c') exp(c' - c)
                    raised = torch.maximum(c_k, c)
                    phi_k = phi_k * torch.exp(c - raised).unsqueeze(2)
                    state = None if state is None else state * torch.exp(c_k - raised)
                    c = raised
                c_k = c
            before, state = chunk_states(phi_k, vb[:, :, g0:g1], state)  # low-rank part: the blocks before
            mine = slice(max(g0, off), g1)  # the key blocks of this group that hold queries
            if mine.start >= mine.stop:
                continue
            qs = slice(mine.start - off, mine.stop - off)
            phi_q, c_q = positive_random_features(qb[:, :, qs], w, scale, offset="row")
            low = phi_q @ before[:, :, mine.start - g0:]
            if not causal:
                low = low + phi_q @ after[:, :, mine]
            low_rank = PartialSums(low[..., :dv], low[..., dv], (c_q + c_k.unsqueeze(2)).squeeze(-1))
            # exact local part: scores of each query block against its own key block, masked, max-subtracted
            scores = qb[:, :, qs] @ kb[:, :, mine].transpose(-2, -1) * scale
            key_slot = torch.arange(n_kb * size, device=q.device).view(-1, size)[mine] - key_front
            keep = ((key_slot >= 0) & (key_slot < nk)).unsqueeze(-2)
            if causal:
                keep = keep & causal_mask(size, size, q.device)                 # key slot <= query slot in the block
            local = from_logits(scores.masked_fill(~keep, float("-inf")), vb[:, :, mine][..., :dv],
                                "bhnqk,bhnkv->bhnqv")
            outputs.append(low_rank.merge(local))
        total = PartialSums(*(torch.cat([getattr(p, f) for p in outputs], dim=2) for f in ("num", "den", "shift")))
        return total.map_queries(lambda t: t.reshape(b, h, -1, t.shape[-1])[:, :, lead:lead + nq])

    @classmethod
    def exact_options(cls, n_keys):
        """One local block covering every key: exact attention for Nq <= Nk (no low-rank term is left)."""
        return {"local_size": n_keys}

    @classmethod
    def budgets(cls, n_keys):
        root = max(8, 2 ** round(math.log2(math.sqrt(n_keys))))
        return [{"local_size": min(n_keys, f // 2), "nb_features": f} for f in (root, 2 * root, 4 * root)]
