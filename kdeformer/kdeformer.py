"""KDEformer (Zandieh, Han, Daliri, Karbasi, ICML 2023), registered as ``kdeformer``.

Softmax attention is D^-1 A V with A_ij = exp(s_ij), s_ij = S q_i . k_j and D = diag(A 1). KDEformer's practical
algorithm (Sec. 4, Alg. 2-3) approximates A [V, 1] (which gives both the numerator and D) as

1. a block-diagonal part found by angular LSH: queries and keys are sorted by the Gray-code position of their
   SimHash bucket (``lsh.py``), the sorted keys cut into blocks of ``bucket_size`` and the sorted queries into as
   many blocks; inside each diagonal block A is computed exactly;
2. plus the residual A - A_block, estimated by ``sample_size`` keys drawn with probability
   p_j ∝ ||v_j|| / ||V||_op + 1/n (their Alg. 3: "row norm sampling" of [V, 1]); a sample j adds
   exp(s_ij) [v_j, 1] / (p_j m) to query i unless j lies in i's own block (already exact). This estimate of the
   residual is unbiased, so numerator and D are unbiased, and the output N / D is consistent.

Everything is computed as :class:`common.partial_sums.PartialSums` (a shift per query that cancels in the ratio),
so float32 does not overflow; float64 inputs keep a float64 path for the error experiments.

Causal attention (our choice, following HyperAttention, Han et al. 2023, Sec. 4): the causal mask is split
recursively into two causal diagonal halves and one full off-diagonal block (later queries x earlier keys), the
halves recursing until ``min_seq_len`` where the causal block is computed exactly, the off-diagonal blocks by the
non-causal approximation above. Every key a query reads lies in its past by construction (tested).
"""
from __future__ import annotations

import math

import torch

from common.attention import AttentionMethod, causal_mask, gather_rows
from common.partial_sums import PartialSums, from_logits
from common.registry import register
from common.validation import check_int

from .lsh import random_projections, sort_by_bucket


def operator_norm(v: torch.Tensor, iterations: int = 8, generator=None) -> torch.Tensor:
    """||V||_op of each (B, H) matrix V (N, Dv) by power iteration on V^T V; (B, H)."""
    x = torch.randn(*v.shape[:2], v.shape[-1], 1, generator=generator, dtype=v.dtype, device=v.device)
    for _ in range(iterations):
        x = v.transpose(-1, -2) @ (v @ x)
        x = x / x.norm(dim=-2, keepdim=True).clamp_min(1e-30)
    return (v @ x).norm(dim=(-2, -1))


def residual_probabilities(v: torch.Tensor, generator=None) -> torch.Tensor:
    """p_j ∝ ||v_j|| / ||V||_op + 1/n, normalised over keys; (B, H, N)."""
    n = v.shape[2]
    raw = v.norm(dim=-1) / operator_norm(v, generator=generator).clamp_min(1e-30).unsqueeze(-1) + 1.0 / n
    return raw / raw.sum(-1, keepdim=True)


def exact_partial(q, k, v, scale: float, causal: bool) -> PartialSums:
    """Exact sums over all keys (causal: j <= i + Nk - Nq)."""
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        logits = logits.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    return from_logits(logits, v)


def kde_partial(q, k, v, scale: float, num_bits: int, bucket_size: int, sample_size: int,
                generator: torch.Generator) -> PartialSums:
    """Steps 1-2 of the module docstring (non-causal): LSH block-diagonal part + sampled residual."""
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    projections = random_projections(d, num_bits, generator, q.dtype, q.device)
    n_blocks = math.ceil(nk / bucket_size)
    q_block = math.ceil(nq / n_blocks)
    perm_k, perm_q = sort_by_bucket(k, projections), sort_by_bucket(q, projections)
    key_pad, query_pad = n_blocks * bucket_size - nk, n_blocks * q_block - nq
    # padding indices point at row 0 and are masked out below
    perm_k_pad = torch.nn.functional.pad(perm_k, (0, key_pad))
    perm_q_pad = torch.nn.functional.pad(perm_q, (0, query_pad))
    kb = gather_rows(k, perm_k_pad).view(b, h, n_blocks, bucket_size, d)
    vb = gather_rows(v, perm_k_pad).view(b, h, n_blocks, bucket_size, dv)
    qb = gather_rows(q, perm_q_pad).view(b, h, n_blocks, q_block, d)
    block_logits = torch.einsum("bhnqd,bhnkd->bhnqk", qb, kb) * scale
    key_is_pad = (torch.arange(n_blocks * bucket_size, device=q.device) >= nk).view(n_blocks, 1, bucket_size)
    block_logits = block_logits.masked_fill(key_is_pad, float("-inf"))
    parts = from_logits(block_logits, vb, "bhnqk,bhnkv->bhnqv")
    parts = PartialSums(parts.num.view(b, h, -1, dv), parts.den.view(b, h, -1), parts.shift.view(b, h, -1))
    if sample_size > 0 and n_blocks > 1:
        probs = residual_probabilities(v, generator)
        samples = torch.multinomial(probs.view(b * h, nk), sample_size, replacement=True,
                                    generator=generator).view(b, h, sample_size)
        key_block = torch.empty_like(perm_k)
        key_block.scatter_(-1, perm_k, (torch.arange(nk, device=q.device) // bucket_size).expand(b, h, nk))
        sample_block = torch.gather(key_block, -1, samples)  # (B, H, m)
        query_block = (torch.arange(n_blocks * q_block, device=q.device) // q_block).view(1, 1, -1, 1)
        log_w = -torch.log(torch.gather(probs, -1, samples) * sample_size)  # weight 1 / (p_j m)
        sample_logits = torch.einsum("bhqd,bhmd->bhqm", gather_rows(q, perm_q_pad), gather_rows(k, samples)) * scale
        sample_logits = (sample_logits + log_w.unsqueeze(2)).masked_fill(
            sample_block.unsqueeze(2) == query_block, float("-inf"))
        parts = parts.merge(from_logits(sample_logits, gather_rows(v, samples)))
    # back to the original query order, dropping the padded queries
    inverse = torch.empty_like(perm_q).scatter_(-1, perm_q, torch.arange(nq, device=q.device).expand(b, h, nq))
    return PartialSums(gather_rows(parts.num, inverse), torch.gather(parts.den, -1, inverse),
                       torch.gather(parts.shift, -1, inverse))


@register("kdeformer")
class KDEformerAttention(AttentionMethod):
    """KDEformer attention (module docstring). Options: num_bits r (7), bucket_size (64), sample_size (64),
    min_seq_len (exact causal blocks at or below this length; default 2 * bucket_size), seed."""

    randomized = True

    def __init__(self, num_bits: int = 7, bucket_size: int = 64, sample_size: int = 64,
                 min_seq_len: int | None = None, seed: int | None = None, check_finite: bool = True):
        super().__init__(seed=seed, check_finite=check_finite)
        self.num_bits = check_int(num_bits, "num_bits", "kdeformer", minimum=1)
        self.bucket_size = check_int(bucket_size, "bucket_size", "kdeformer", minimum=1)
        self.sample_size = check_int(sample_size, "sample_size", "kdeformer", minimum=0)
        self.min_seq_len = 2 * bucket_size if min_seq_len is None else check_int(
            min_seq_len, "min_seq_len", "kdeformer", minimum=1)

    def _approx(self, q, k, v, scale):
        return kde_partial(q, k, v, scale, self.num_bits, self.bucket_size, self.sample_size,
                           self.generator(q.device))

    def _causal(self, q, k, v, scale) -> PartialSums:
        """HyperAttention's recursive causal split on a square (n x n) causal mask."""
        n = q.shape[2]
        if n <= self.min_seq_len:
            return exact_partial(q, k, v, scale, causal=True)
        half = n // 2
        first = self._causal(q[:, :, :half], k[:, :, :half], v[:, :, :half], scale)
        second = self._causal(q[:, :, half:], k[:, :, half:], v[:, :, half:], scale)
        off_diagonal = self._approx(q[:, :, half:], k[:, :, :half], v[:, :, :half], scale)
        return PartialSums.cat([first, second.merge(off_diagonal)])

    def attend(self, q, k, v, causal, scale):
        if not causal:
            return self._approx(q, k, v, scale).output()
        nq, nk = q.shape[2], k.shape[2]
        parts = self._causal(q, k[:, :, nk - nq:], v[:, :, nk - nq:], scale)
        if nk > nq:  # keys before the first query's position are visible to every query
            parts = parts.merge(self._approx(q, k[:, :, :nk - nq], v[:, :, :nk - nq], scale))
        return parts.output()

    @classmethod
    def budgets(cls, n_keys):
        root = max(8, 2 ** round(math.log2(math.sqrt(n_keys))))
        return [{"bucket_size": min(n_keys, f // 2), "sample_size": f} for f in (root, 2 * root, 4 * root)]
