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
The bound b_i is valid only if S_i holds the true top keys (an exact index, ``flat``/``torch``). With an
approximate index the cutoff is widened (Mussmann et al. 2017): B = M - b_i - c, where c bounds how far above b_i a
missed key may score (:func:`tail_bound`; ``c='cauchy_schwarz'`` uses S |q_i| max |k_j|, valid for any index), and
sampling stays exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

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

    def select(self, rows: torch.Tensor) -> "RetrievedSet":
        """The retrieved sets of the queries ``rows`` (B, H, R) (repeats allowed), e.g. the starts of random walks."""
        def pick(t):
            index = rows.view(*rows.shape, *([1] * (t.dim() - 3))).expand(*rows.shape, *t.shape[3:])
            return t.gather(2, index)
        return RetrievedSet(*(pick(t) for t in (self.indices, self.allowed, self.scores, self.bound, self.counts,
                                                  self.top_size)))

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


_NO_KEY = 2 ** 62  # larger than any key id plus the width of any retrieved set


def tail_rank_to_index(top: RetrievedSet, ranks: torch.Tensor) -> torch.Tensor:
    """Map ranks r in [0, |T_i|) (..., num) to the r-th key of the tail T_i = P_i \\ S_i.

    With the allowed retrieved ids sorted as s_0 < s_1 < ..., the r-th key not in S_i is
    r + #{t : s_t - t <= r}, found by one ``searchsorted``. Slots not allowed sort last as a constant sentinel far
    above any key id (no value is read back from the device).
    """
    s_sorted = torch.where(top.allowed, top.indices, torch.full_like(top.indices, _NO_KEY)).sort(-1).values
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


_MAX_REDRAW_ROUNDS = 200
_SCORE_CHUNK = 2 ** 16
# The static layout of lazy Gumbel sampling misses a candidate with at most this probability per call.
STATIC_FAILURE = 1e-9


def _distinct_ranks(tail: torch.Tensor, m: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """For each group g (a query's sample), m_g distinct ranks drawn uniformly from [0, tail_g): a uniform
    m_g-subset, returned flat as (group id (M,), rank (M,)), M = sum m_g (no padding to the largest m).

    Groups with 2 m > tail take the first m of a random order of their tail (O(tail) <= O(2 m)); the others draw
    with replacement, keep one copy of each value and redraw the missing slots, until distinct. Both procedures
    commute with any relabelling of the tail, so the subset they return is uniform among m-subsets. A redraw round
    keeps each slot with probability >= 1/2, so the loop ends in O(log m) rounds; it is bounded all the same.
    """
    dev = m.device
    dense = 2 * m > tail
    groups, ranks = [], []
    if dense.any():
        g_dense = dense.nonzero().squeeze(-1)
        sizes = tail[g_dense]
        owner = torch.repeat_interleave(g_dense, sizes)
        rank = torch.arange(int(sizes.sum()), device=dev) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes,
                                                                                      sizes)
        order = torch.rand(owner.shape, generator=generator, device=dev, dtype=torch.float64).argsort()
        order = order[owner[order].argsort(stable=True)]  # a random order of each group's tail, groups in order
        owner, rank = owner[order], rank[order]
        position = torch.arange(owner.numel(), device=dev) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes,
                                                                                      sizes)
        keep = position < m[owner]
        groups.append(owner[keep])
        ranks.append(rank[keep])
    sparse = (~dense & (m > 0)).nonzero().squeeze(-1)
    if sparse.numel():
        owner = torch.repeat_interleave(sparse, m[sparse])
        rank = _uniform_ranks(tail[owner], 1, generator).squeeze(-1)
        width = int(tail.max()) + 1
        for _ in range(_MAX_REDRAW_ROUNDS):
            key = owner * width + rank
            srt, order = key.sort()
            dup = torch.zeros_like(key, dtype=torch.bool)
            dup[order[1:]] = srt[1:] == srt[:-1]  # every copy after the first of a (group, rank) pair
            if not dup.any():
                break
            rank[dup] = _uniform_ranks(tail[owner[dup]], 1, generator).squeeze(-1)
        else:
            raise RuntimeError(f"knn: lazy Gumbel sampling could not draw distinct tail keys in "
                               f"{_MAX_REDRAW_ROUNDS} rounds (tail sizes {tail.min().item()}..{tail.max().item()})")
        groups.append(owner)
        ranks.append(rank)
    if not groups:
        return m.new_zeros(0), m.new_zeros(0)
    return torch.cat(groups), torch.cat(ranks)


def _tail_rank_to_index_flat(top: RetrievedSet, row: torch.Tensor, ranks: torch.Tensor, n_keys: int) -> torch.Tensor:
    """:func:`tail_rank_to_index` for ranks (M,) of rows ``row`` (M,) (flat ids over (B, H, Nq)): one searchsorted
    on the rows' sorted retrieved ids laid end to end, each row offset by ``row * width`` so the whole is sorted
    (width from ``n_keys`` >= every |P_i|: a static bound, nothing read back)."""
    kk = top.indices.shape[-1]
    counts = top.counts.reshape(-1)
    width = n_keys + kk + 2
    s_sorted = torch.where(top.allowed, top.indices, torch.full_like(top.indices, width)).sort(-1).values
    shifted = (s_sorted - torch.arange(kk, device=ranks.device)).clamp_max(width - 1).reshape(-1, kk)
    offsets = torch.arange(shifted.shape[0], device=ranks.device) * width
    seq = (shifted + offsets.unsqueeze(-1)).reshape(-1)
    found = torch.searchsorted(seq, ranks + offsets[row], right=True) - row * kk
    return torch.minimum(ranks + found, counts[row] - 1)


def tail_bound(q, k, top: RetrievedSet, scale: float, slack: float | str = 0.0) -> torch.Tensor:
    """U_i >= s_ij for every tail key j of query i (B, H, Nq): the smallest retrieved score plus ``slack`` c (the
    widened cutoff of Mussmann, Levy & Ermon 2017, Sec. 4: an approximate index whose misses score at most c above
    its smallest hit keeps lazy Gumbel sampling exact with B = M - s_min - c), or, with ``slack='cauchy_schwarz'``,
    S |q_i| max_{j in P_i} |k_j| (valid for any index, looser)."""
    if slack == "cauchy_schwarz":
        norms = k.detach().norm(dim=-1).double().cummax(-1).values  # (B, H, Nk) max norm of each prefix
        prefix_max = norms.gather(-1, (top.counts - 1).clamp_min(0).expand(*norms.shape[:2], -1))
        return scale * q.detach().double().norm(dim=-1) * prefix_max
    return top.bound.double() + float(slack)


def candidate_capacity(segments: int, ratio: float, failure: float = STATIC_FAILURE) -> int:
    """The static number W of tail candidates of :func:`lazy_gumbel_sample`'s static layout for ``segments``
    samples (all rows' samples of one call) with |T_i| / h_i <= ``ratio`` (h_i the index's hits of row i): the
    smallest W with P(N > W) <= ``failure``, N the number of candidate points.

    With an exact index every hit scores at least the cutoff's bound U_i, so M_is >= U_i + max_{hits} G and the
    sample's tail hazard Lambda_is = |T_i| e^{-(M_is - U_i)} <= ratio h_i e^{-max of h_i Gumbels} = ratio E_is,
    E_is ~ Exp(1) independent; N is Poisson(sum Lambda) <= Poisson(ratio Gamma(segments)) (a negative binomial with
    mean segments * ratio), and by Chernoff P(N > W) <= min_t (1 - t)^(-segments) (1 + t / ratio)^(-W), t in
    (0, 1). W is about segments * ratio (1 + sqrt(2 ln(1/failure) / segments)) for many segments and
    ratio ln(1/failure) for one."""
    log_failure = math.log(failure)
    ts = [i / 400 for i in range(1, 400)]

    def log_bound(w):
        return min(-segments * math.log1p(-t) - w * math.log1p(t / ratio) for t in ts)

    hi = max(1, math.ceil(segments * ratio))
    while log_bound(hi) > log_failure:
        hi *= 2
    lo = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if log_bound(mid) <= log_failure else (mid, hi)
    return hi


def _candidate_scores(q, k, row: torch.Tensor, cand: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 scores scale q_row . k_cand of candidates (M,): ``row`` flat ids over (B, H, Nq), ``cand`` key ids
    of the row's head; scored in pieces of ``_SCORE_CHUNK`` candidates (O(chunk d) memory)."""
    nq, nk = q.shape[2], k.shape[2]
    q_flat, k_flat = q.detach().reshape(-1, q.shape[-1]), k.detach().reshape(-1, k.shape[-1])
    key_id = (row // nq) * nk + cand
    return torch.cat([
        torch.einsum("md,md->m", q_flat.index_select(0, row[i:i + _SCORE_CHUNK]),
                     k_flat.index_select(0, key_id[i:i + _SCORE_CHUNK]))
        for i in range(0, row.numel(), _SCORE_CHUNK)]).double() * scale


def _static_tail_winner(q, k, top: RetrievedSet, threshold, num_samples: int, scale: float, generator,
                        ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 3 with static shapes for every sample of every row at once: (best tail value (R,), its key (R,),
    candidates that beat the cutoff per row (B, H, Nq)), R = B H Nq l samples with cutoffs ``threshold`` (R,).

    Tail key j of sample s beats the cutoff B_s with probability p_s = 1 - exp(-e^{-B_s}), independently: the
    cells of a Bernoulli process, which is a unit-rate Poisson process on the cumulative hazard axis, cell j of
    sample s owning an interval of length lambda_s = e^{-B_s} (a cell holds a point with probability
    1 - e^{-lambda_s} = p_s). So the points of W Exp(1) gaps laid end to end (W = :func:`candidate_capacity`),
    mapped back to (sample, cell) by one searchsorted and deduplicated, are exactly the beating keys, for every
    sample at once, with no count read back; the draw is exact unless the W points end before the last sample's
    interval, which happens with probability <= ``STATIC_FAILURE`` (then the last samples miss some candidates).
    """
    b, h, nq, kk = top.indices.shape
    dev = q.device
    tail = top.tail_size.unsqueeze(-1).expand(b, h, nq, num_samples).reshape(-1)
    rate = torch.exp(-threshold)  # lambda_s, float64; inf when the cutoff is -inf (then the tail is empty)
    hazard = torch.where(tail > 0, tail * rate, 0.0)
    ends = hazard.cumsum(0)
    n_seg, width = hazard.numel(), candidate_capacity(hazard.numel(), max(ratio, 1e-12))
    gaps = torch.rand(width, generator=generator, device=dev, dtype=torch.float64)
    points = (-torch.log1p(-gaps)).cumsum(0)
    seg = torch.searchsorted(ends, points, right=True)
    valid = seg < n_seg
    seg = seg.clamp_max(n_seg - 1)
    start = ends.gather(0, seg) - hazard.gather(0, seg)
    cell = torch.minimum(((points - start) / rate.gather(0, seg)).long().clamp_min(0),
                         (tail.gather(0, seg) - 1).clamp_min(0))
    first = valid & torch.cat([seg.new_ones(1, dtype=torch.bool),
                               (seg[1:] != seg[:-1]) | (cell[1:] != cell[:-1])])
    row = seg // num_samples
    cand = _tail_rank_to_index_flat(top, row, cell, k.shape[2])
    cand_scores = _candidate_scores(q, k, row, cand, scale)
    u2 = torch.rand(width, generator=generator, device=dev, dtype=torch.float64)
    p_beat = -torch.expm1(-rate.gather(0, seg))
    gumbel = -torch.log(-torch.log1p(-p_beat * u2.clamp_min(1e-300)))  # G | G > B
    value = torch.where(first, cand_scores + gumbel, float("-inf"))
    best = torch.full((n_seg,), float("-inf"), device=dev, dtype=torch.float64).scatter_reduce_(0, seg, value, "amax")
    is_best = first & (value == best.gather(0, seg))
    winner = torch.zeros(n_seg + 1, dtype=torch.long, device=dev).scatter_(
        0, torch.where(is_best, seg, n_seg), cand)[:n_seg]
    beaten = torch.zeros(b * h * nq, dtype=torch.long, device=dev).scatter_add_(0, row, first.long())
    return best, winner, beaten.view(b, h, nq)


def lazy_gumbel_sample(q, k, top: RetrievedSet, num_samples: int, scale: float, generator: torch.Generator,
                       slack: float | str = 0.0, static_ratio: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` exact samples of softmax(s_i) over P_i per query (steps 1-3 above).

    Host layout (``static_ratio=None``): every sample s of query i draws its own tail count
    m_is ~ Binomial(|T_i|, P(G > B_is)); the m_is candidates of all samples are laid end to end (no padding to the
    largest m), scored with one row-wise product and reduced per sample with a scatter max, so the work is
    |S_i| + sum_s m_is score evaluations per query; the sizes are read back to the host (``nonzero``,
    ``int(...)``), so this layout synchronises on a GPU. ``slack``: see :func:`tail_bound` (0 for an exact index).

    Static layout (``static_ratio`` = r, a bound of |T_i| / h_i from the shapes, h_i the index's hits; exact
    indexes only, ``slack`` 0): :func:`_static_tail_winner`, every shape from the input shapes and r, nothing read
    back. The candidates are W = :func:`candidate_capacity` points for all samples at once, about
    (1 + sqrt(2 ln(1/failure) / R)) times the mean bound R r over R samples (sampling stays exact except with
    probability ``STATIC_FAILURE`` per call). Its cost: W score evaluations where the host layout spends
    sum m_is; since E[m_is] <= r, W is within a small factor of the host layout's work when R is large (e.g. 1.06x
    for R = 10^5), and up to ln(1/failure) ~ 28 times it for a single sample.

    Returns (indices (B, H, Nq, l), score evaluations per query (B, H, Nq): |S_i| plus the tail candidates that
    beat the cutoff, the ones the host layout scores).
    """
    b, h, nq, kk = top.indices.shape
    dev = q.device
    with torch.no_grad():
        scores = top.scores.detach().unsqueeze(3)  # (B, H, Nq, 1, k')
        u = torch.rand(b, h, nq, num_samples, kk, generator=generator, device=dev, dtype=torch.float64)
        perturbed = scores.double() - torch.log(-torch.log(u.clamp_min(1e-300)))
        best, arg = perturbed.max(-1)  # M and its slot, (B, H, Nq, l); M = -inf when S_i is empty
        winner = torch.gather(top.indices, 3, arg)
        threshold = best - tail_bound(q, k, top, scale, slack).unsqueeze(-1)  # B = M - U_i
        if static_ratio is not None:
            if slack != 0:
                raise ValueError("knn: the static lazy Gumbel layout needs an exact index (tail_slack 0)")
            tail_best, tail_winner, beaten = _static_tail_winner(
                q, k, top, threshold.nan_to_num(float("inf")).reshape(-1), num_samples, scale, generator,
                static_ratio)
            take_tail = tail_best.view_as(best) > best
            return torch.where(take_tail, tail_winner.view_as(winner), winner), top.top_size + beaten
        if torch.isnan(threshold).any():
            raise ValueError("knn: non-finite scores in lazy Gumbel sampling (the Gumbel cutoff is NaN)")
        p_beat = -torch.expm1(-torch.exp(-threshold))  # P(G > B), 1 when B = -inf
        tail = top.tail_size.unsqueeze(-1).expand_as(p_beat).reshape(-1)
        m = torch.binomial(tail.double(), p_beat.reshape(-1), generator=generator).long()
        group, ranks = _distinct_ranks(tail, m, generator)
        row = group // num_samples
        evaluations = top.top_size + torch.bincount(row, minlength=b * h * nq).view(b, h, nq)
        if group.numel() == 0:
            return winner, evaluations
        cand = _tail_rank_to_index_flat(top, row, ranks, k.shape[2])
        cand_scores = _candidate_scores(q, k, row, cand, scale)
        u2 = torch.rand(cand.shape, generator=generator, device=dev, dtype=torch.float64)
        gumbel = -torch.log(-torch.log1p(-p_beat.reshape(-1)[group] * u2.clamp_min(1e-300)))  # G | G > B
        value = cand_scores + gumbel
        group_best = torch.full((b * h * nq * num_samples,), float("-inf"), device=dev, dtype=torch.float64)
        group_best.scatter_reduce_(0, group, value, "amax")
        tail_winner = torch.zeros(group_best.shape, dtype=torch.long, device=dev)
        is_best = value == group_best[group]
        tail_winner[group[is_best]] = cand[is_best]
        take_tail = group_best.view_as(best) > best
        return torch.where(take_tail, tail_winner.view_as(winner), winner), evaluations


def adaptive_top_set(top: RetrievedSet, n_hits: int, k_min: int, tail_ratio: float) -> RetrievedSet:
    """Keep, per query, the smallest prefix of the index's hits (ranked by score) whose outside mass is bounded
    relative to the inside mass: the first r >= k_min with

        (|P_i| - |S_i(r)|) e^{s_(r)} <= tail_ratio * sum_{j in S_i(r)} e^{s_ij},

    s_(r) the r-th best hit score (every key outside S_i(r) scores at most s_(r) with an exact index), or all
    ``n_hits`` hits if no prefix qualifies. The hits beyond the kept prefix join the tail (they are sampled like
    any other tail key). ``top``'s first ``n_hits`` columns are the index's hits, the rest exact extra keys (the
    causal own block), which always stay in S_i and count in the inside mass.
    """
    hit_scores = top.scores[..., :n_hits].detach().double()
    order = hit_scores.argsort(-1, descending=True)
    ranked = hit_scores.gather(-1, order)
    extra = top.scores[..., n_hits:].detach().double()
    log_inside = ranked.logcumsumexp(-1)
    if extra.shape[-1]:
        log_inside = torch.logaddexp(log_inside, extra.logsumexp(-1, keepdim=True))
    inside = torch.isfinite(ranked).long().cumsum(-1) + top.allowed[..., n_hits:].sum(-1, keepdim=True)
    outside = (top.counts.unsqueeze(-1) - inside).double()
    ok = (outside.log() + ranked <= math.log(tail_ratio) + log_inside) | ~torch.isfinite(ranked)
    ok &= torch.arange(1, n_hits + 1, device=ok.device) >= min(k_min, n_hits)
    ok[..., -1] = True
    keep_ranked = torch.arange(n_hits, device=ok.device) <= ok.long().argmax(-1, keepdim=True)
    keep = torch.zeros_like(keep_ranked).scatter(-1, order, keep_ranked)
    keep = torch.cat([keep, torch.ones_like(top.allowed[..., n_hits:])], -1)
    allowed = top.allowed & keep
    bound = top.scores.detach()[..., :n_hits].masked_fill(~allowed[..., :n_hits], float("inf")).amin(-1)
    bound = torch.where(allowed[..., :n_hits].any(-1), bound, top.bound)
    return replace(top, allowed=allowed, scores=top.scores.masked_fill(~allowed, float("-inf")), bound=bound,
                   top_size=allowed.sum(-1))


def median_of_means_sizes(eps: float, delta: float) -> tuple[int, int]:
    """(groups g, samples per group m) for P(|o_hat_ic - o_ic| > eps R_c) <= delta, R_c = max_j |v_jc|.

    A group mean of m samples has variance Var(v_Jc) / m <= R_c^2 / m, so by Chebyshev it misses by more than
    eps R_c with probability <= 1 / (m eps^2) = 1/4 for m = ceil(4 / eps^2). The median of g group means misses
    only if at least g/2 groups miss: P(Binomial(g, 1/4) >= g/2) <= exp(-2 g (1/4)^2) = exp(-g/8) (Hoeffding)
    <= delta for g = ceil(8 ln(1/delta)). In all l = g m = O(log(1/delta) / eps^2) samples per query, independent
    of n (Haris 2024, Thm. 4.2's sample count with the median-of-means boost).
    """
    return math.ceil(8 * math.log(1 / delta)) // 2 * 2 + 1, math.ceil(4 / eps ** 2)  # g odd: one median


def median_of_means(values: torch.Tensor, samples: torch.Tensor, groups: int) -> torch.Tensor:
    """Coordinate-wise median of ``groups`` means of consecutive sample groups: values (B, H, Nk, Dv), samples
    (B, H, Nq, g m) -> (B, H, Nq, Dv) (see :func:`median_of_means_sizes`)."""
    b, h, nq, num = samples.shape
    means = gather_rows(values, samples).view(b, h, nq, groups, num // groups, -1).mean(4)
    return means.median(3).values


def expectation_estimate(values: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """(1/l) sum_s f(j_s) with f(j) = values[j]: the unbiased estimate of E_{j ~ D_i}[f(j)] (Haris 2024, eq. 3).

    values: (B, H, Nk, Dv); samples: (B, H, Nq, l) -> (B, H, Nq, Dv).
    """
    return gather_rows(values, samples).mean(dim=3)
