"""Attention as an expectation, and exact sampling from the softmax with lazy Gumbel sampling.

Row i of softmax attention is an expectation (Haris 2024, eq. 2):

    o_i = sum_j softmax(s_i)_j v_j = E_{j ~ D_i}[v_j],     s_ij = S q_i . k_j,  D_i = softmax(s_i) over P_i,

with P_i the keys query i may read. It can be estimated by averaging v over samples of D_i
(:func:`expectation_estimate`). Sampling D_i exactly costs O(|P_i|) with the Gumbel-max trick
(argmax_j s_ij + G_j, G_j i.i.d. standard Gumbel). Lazy Gumbel sampling (Mussmann, Levy & Ermon 2017; used in
Haris 2024, Alg. 1) only evaluates the scores of the retrieved top set S_i and of the few tail keys whose Gumbel
is large enough to possibly win:

1. M = max_{j in S_i} s_ij + G_j  (the best perturbed score of the top set);
2. every tail key j (in P_i \\ S_i) has s_ij <= b_i, the smallest retrieved score, so it can only win if
   G_j > B = M - b_i; the number m of such keys is Binomial(|P_i \\ S_i|, 1 - exp(-exp(-B)));
3. draw which m tail keys (uniformly, distinct) and their Gumbels conditioned on exceeding B, evaluate their
   scores, and return the argmax over S_i and those m keys.

The result is an exact sample of D_i. With |S_i| = k ~ sqrt(n), E[m] is O(n / k) = O(sqrt(n)), so a sample costs
O(sqrt(n)) score evaluations instead of n (measured in tests/knn_attention and the efficiency script).
The bound b_i is valid only if S_i holds the true top keys, so this needs an exact index (``flat``/``torch``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.attention import gather_rows


@dataclass
class RetrievedSet:
    """The retrieved top set S_i of every query, restricted to the keys it may read.

    indices: (B, H, Nq, k') long, retrieved key ids (entries not allowed are arbitrary, see ``allowed``);
    allowed: (B, H, Nq, k') bool, the retrieved key is in P_i (causal prefix) and is a real hit;
    scores: (B, H, Nq, k') S q . k of the retrieved keys (differentiable; -inf where not allowed);
    bound: (B, H, Nq) an upper bound of every non-retrieved key's score (the smallest retrieved score; valid for
        exact indices); counts: (B?, Nq) |P_i|; top_size: (B, H, Nq) |S_i|.
    """
    indices: torch.Tensor
    allowed: torch.Tensor
    scores: torch.Tensor
    bound: torch.Tensor
    counts: torch.Tensor
    top_size: torch.Tensor

    @property
    def tail_size(self) -> torch.Tensor:
        """|P_i \\ S_i| of each query, (B, H, Nq)."""
        return self.counts - self.top_size


def retrieved_set(q, k, indices: torch.Tensor, counts: torch.Tensor, scale: float,
                  local: torch.Tensor | None = None) -> RetrievedSet:
    """Score the retrieved ``indices`` (B, H, Nq, k') and mask those outside each query's allowed keys.

    ``counts``: (Nq,) |P_i| of these queries (``common.attention.allowed_key_counts``, sliced for a chunk).
    ``local``: optional (Nq, w) key ids (-1 = none) that join S_i exactly, e.g. the causal query's own block;
    they must be disjoint from ``indices`` and do not enter the tail bound, which only the index's hits guarantee.
    """
    counts = counts.view(1, 1, -1)
    hit = indices >= 0
    safe = indices.clamp_min(0)
    allowed = hit & (safe < counts.unsqueeze(-1))
    if local is not None:
        lead = indices.shape[:2]
        extra = local.to(indices.device).expand(*lead, *local.shape)
        safe = torch.cat([safe, extra.clamp_min(0)], -1)
        allowed = torch.cat([allowed, (extra >= 0) & (extra < counts.unsqueeze(-1))], -1)
        hit = torch.cat([hit, torch.zeros_like(extra, dtype=torch.bool)], -1)
    raw = torch.einsum("bhqd,bhqkd->bhqk", q, gather_rows(k, safe)) * scale
    bound = raw.detach().masked_fill(~hit, float("inf")).amin(-1)
    scores = raw.masked_fill(~allowed, float("-inf"))
    top_size = allowed.sum(-1)
    return RetrievedSet(indices=safe, allowed=allowed, scores=scores, bound=bound,
                        counts=counts.expand_as(top_size), top_size=top_size)


def tail_rank_to_index(top: RetrievedSet, ranks: torch.Tensor) -> torch.Tensor:
    """Map ranks r in [0, |T_i|) (..., num) to the r-th key of the tail T_i = P_i \\ S_i.

    With the allowed retrieved ids sorted as s_0 < s_1 < ..., the r-th key not in S_i is
    r + #{t : s_t - t <= r}, found by one ``searchsorted``.
    """
    sentinel = top.counts.max().item() + top.indices.shape[-1] + 1
    s_sorted = torch.where(top.allowed, top.indices, torch.full_like(top.indices, sentinel)).sort(-1).values
    shifted = s_sorted - torch.arange(s_sorted.shape[-1], device=s_sorted.device)
    index = ranks + torch.searchsorted(shifted.contiguous(), ranks.contiguous(), right=True)
    return torch.minimum(index, top.counts.unsqueeze(-1) - 1)  # only rows with an empty tail are clamped


def _uniform_ranks(tail: torch.Tensor, num: int, generator) -> torch.Tensor:
    u = torch.rand(*tail.shape, num, generator=generator, device=tail.device, dtype=torch.float64)
    t = tail.unsqueeze(-1)
    return torch.minimum((u * t).long(), (t - 1).clamp_min(0))


def sample_tail_uniform(top: RetrievedSet, num: int, generator: torch.Generator) -> torch.Tensor:
    """``num`` indices per query drawn uniformly (with replacement) from the tail P_i \\ S_i; (B, H, Nq, num).

    Rows with an empty tail get index 0 (their weight is zero in every estimator).
    """
    return tail_rank_to_index(top, _uniform_ranks(top.tail_size, num, generator))


def _distinct_ranks(tail: torch.Tensor, m: torch.Tensor, m_max: int, generator) -> torch.Tensor:
    """Per row, the first m of m_max slots hold m distinct uniform ranks in [0, tail) (an m-subset).

    Rows where m^2 > tail take the first m of a random permutation of the tail (O(tail)); the others draw with
    replacement and redraw rows with a repeat (rejection keeps the subset uniform; repeats are rare there).
    """
    ranks = _uniform_ranks(tail, m_max, generator)
    slots = torch.arange(m_max, device=m.device)
    live = slots < m.unsqueeze(-1)
    dense = (m * m > tail).nonzero().squeeze(-1)
    if dense.numel():
        width = max(int(tail[dense].max().item()), m_max)
        keys = torch.rand(dense.numel(), width, generator=generator, device=m.device, dtype=torch.float64)
        keys = keys.masked_fill(torch.arange(width, device=m.device) >= tail[dense].unsqueeze(-1), 2.0)
        ranks[dense] = keys.argsort(-1)[:, :m_max]
    while True:
        tagged = torch.where(live, ranks, -1 - slots)  # dead slots never collide
        srt, order = tagged.sort(-1)
        dup = torch.zeros_like(live)
        dup.scatter_(-1, order[:, 1:], srt[:, 1:] == srt[:, :-1])
        redo = (dup & live).any(-1).nonzero().squeeze(-1)
        if redo.numel() == 0:
            return ranks
        ranks[redo] = _uniform_ranks(tail[redo], m_max, generator)


def lazy_gumbel_sample(q, k, top: RetrievedSet, num_samples: int, scale: float,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` exact samples of softmax(s_i) over P_i per query (steps 1-3 above).

    Returns (indices (B, H, Nq, l), score evaluations per query (B, H, Nq): |S_i| + sum over samples of m).
    """
    b, h, nq, kk = top.indices.shape
    dev = q.device
    with torch.no_grad():
        scores = top.scores.detach().unsqueeze(3)  # (B, H, Nq, 1, k')
        u = torch.rand(b, h, nq, num_samples, kk, generator=generator, device=dev, dtype=torch.float64)
        perturbed = scores.double() - torch.log(-torch.log(u.clamp_min(1e-300)))
        best, arg = perturbed.max(-1)  # M and its slot, (B, H, Nq, l); M = -inf when S_i is empty
        winner = torch.gather(top.indices, 3, arg)
        threshold = best - top.bound.unsqueeze(-1).double()  # B = M - b_i
        p_beat = -torch.expm1(-torch.exp(-threshold))  # P(G > B), 1 when B = -inf
        tail = top.tail_size.unsqueeze(-1).expand_as(p_beat)
        m = torch.binomial(tail.double(), p_beat, generator=generator).long()
        evaluations = top.top_size + m.sum(-1)
        m_max = int(m.max().item()) if m.numel() else 0
        if m_max == 0:
            return winner, evaluations
        ranks = _distinct_ranks(tail.reshape(-1), m.reshape(-1), m_max, generator)
        cand = tail_rank_to_index(top, ranks.view(b, h, nq, num_samples * m_max)).view(b, h, nq, num_samples, m_max)
        cand_scores = torch.einsum("bhqd,bhqsmd->bhqsm", q.detach(), gather_rows(k.detach(), cand)).double() * scale
        u2 = torch.rand(cand.shape, generator=generator, device=dev, dtype=torch.float64)
        gumbel = -torch.log(-torch.log1p(-p_beat.unsqueeze(-1) * u2.clamp_min(1e-300)))  # G | G > B
        live = torch.arange(m_max, device=dev) < m.unsqueeze(-1)
        cand_best, cand_arg = (cand_scores + gumbel).masked_fill(~live, float("-inf")).max(-1)
        take_tail = cand_best > best
        winner = torch.where(take_tail, torch.gather(cand, 4, cand_arg.unsqueeze(-1)).squeeze(-1), winner)
        return winner, evaluations


def expectation_estimate(values: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """(1/l) sum_s f(j_s) with f(j) = values[j]: the unbiased estimate of E_{j ~ D_i}[f(j)] (Haris 2024, eq. 3).

    values: (B, H, Nk, Dv); samples: (B, H, Nq, l) -> (B, H, Nq, Dv).
    """
    return gather_rows(values, samples).mean(dim=3)
