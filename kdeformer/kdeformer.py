"""KDEformer (Zandieh, Han, Daliri, Karbasi, ICML 2023, arXiv 2302.02451), registered as ``kdeformer``.

Softmax attention is D^-1 A V with A_ij = exp(s_ij), s_ij = S q_i . k_j and D = diag(A 1). KDEformer's practical
algorithm (Sec. 4, Alg. 2-3) approximates A [V, 1] (which gives both the numerator and D) as

1. a block-diagonal part found by angular LSH: queries and keys are sorted by the Gray-code position of their
   SimHash bucket (``lsh.py``), the sorted keys cut into blocks of ``bucket_size`` and the sorted queries into as
   many blocks; inside each diagonal block A is computed exactly;
2. plus the residual A - A_block, estimated by ``sample_size`` keys drawn with probability
   p_j ∝ ||v_j|| / ||V||_op + 1/n (their Alg. 3: "row norm sampling" of [V, 1]); a sample j adds
   exp(s_ij) [v_j, 1] / (p_j m) to query i unless j lies in i's own block (already exact). This estimate of the
   residual is unbiased, so numerator and D are unbiased, and the output N / D is consistent.

Implementation: both parts are one attention per block. Query block b attends to the keys
[its ``bucket_size`` LSH keys ; the m sampled keys] with the additive log-weights
[0 ; log(1 / (p_j m))], -inf for padding and for samples that fall in block b, i.e. exp(s_ij + log w_j) = w_j e^s_ij.
All blocks go through one batched ``scaled_dot_product_attention`` over a (B*H, blocks, rows, D) layout, so
there is no Python loop over blocks or queries and the per-row max subtraction of the fused softmax keeps float32
from overflowing; float64 inputs are computed in float64 (the error experiments). :func:`kde_partial` gives the
same estimate as separate sums (numerator, normaliser; :class:`common.partial_sums.PartialSums`) where pieces must
be merged (causal attention) or the sums themselves are of interest (the unbiasedness test).

Causal attention (our choice, following HyperAttention, Han et al. 2023, Sec. 4 / Alg. 4): the n x n causal mask
is split recursively into two causal diagonal halves and one full off-diagonal block (later queries x earlier
keys). After L levels (the first L with ceil(n / 2^L) <= ``min_seq_len``) the 2^L diagonal chunks are computed
exactly with a causal mask, and at level l the 2^l off-diagonal blocks by the non-causal approximation above;
each level is one batched call (its blocks folded into the head dimension). Every key a query reads lies in its
past by construction: the approximated blocks only contain earlier keys, so the LSH blocks and the residual
sample of such a block are past keys only (tested by changing future keys). With Nk > Nq the Nk - Nq keys before
the first query are visible to every query and are one more non-causal block.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from common.attention import AttentionMethod, causal_mask, gather_rows
from common.partial_sums import PartialSums, from_logits
from common.registry import register
from common.validation import check_int

from .lsh import random_projections, sort_by_bucket


def operator_norm(v: torch.Tensor, iterations: int = 8, generator=None) -> torch.Tensor:
    """||V||_op of each (B, H) matrix V (N, Dv): power iteration x <- G x / ||G x|| on the Gram matrix
    G = V^T V (Dv x Dv, formed once, so each iteration costs Dv^2 instead of N Dv); ||V||_op = sqrt(x^T G x)."""
    gram = v.transpose(-1, -2) @ v
    x = torch.randn(*v.shape[:2], v.shape[-1], 1, generator=generator, dtype=v.dtype, device=v.device)
    for _ in range(iterations):
        x = gram @ x
        x = x / x.norm(dim=-2, keepdim=True).clamp_min(1e-30)
    return (x.transpose(-1, -2) @ gram @ x).clamp_min(0).sqrt().view(v.shape[:2])


def residual_probabilities(v: torch.Tensor, generator=None) -> torch.Tensor:
    """p_j ∝ ||v_j|| / ||V||_op + 1/n, normalised over keys; (B, H, N), in float32 for half-precision v (norms and
    the Gram matrix of the power iteration would lose digits or overflow in bfloat16 / float16)."""
    n = v.shape[2]
    v = v.to(accumulation_dtype(v.dtype))
    raw = v.norm(dim=-1) / operator_norm(v, generator=generator).clamp_min(1e-30).unsqueeze(-1) + 1.0 / n
    return raw / raw.sum(-1, keepdim=True)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bfloat16 / float16 inputs (random draws, sampling probabilities, log-weights and explicit sums are
    computed in it), else the input dtype itself (float32, float64)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


@dataclass
class KDEBlocks:
    """The per-block attention problems of one KDEformer call (module docstring, "Implementation").

    queries (B, H, nb, Q, D): the LSH-sorted queries, Q = ceil(Nq / nb) rows per block (zero rows pad the last);
    keys (B, H, nb, K, D), values (B, H, nb, K, Dv): K = bucket_size LSH keys of the block, then the m samples;
    bias (B, H, nb, 1, K): the log-weight added to each logit (0, log 1/(p_j m), or -inf = excluded), in
    :func:`accumulation_dtype` (the fused call rounds it to the input dtype: in bfloat16 a log-weight near
    log(n / m) ~ 3 keeps about 1% of relative precision in its weight);
    inverse (B, H, Nq): the row of each original query in the flattened (nb * Q) block order.
    """
    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor
    inverse: torch.Tensor

    def unsort(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, H, nb, Q, ...) per-block rows -> (B, H, Nq, ...) in the original query order."""
        b, h, nb, nq_block = rows.shape[:4]
        flat = rows.reshape(b, h, nb * nq_block, math.prod(rows.shape[4:]))
        out = gather_rows(flat, self.inverse)
        return out.view(*out.shape[:3], *rows.shape[4:])


def kde_blocks(q, k, v, num_bits: int, bucket_size: int, sample_size: int, generator: torch.Generator) -> KDEBlocks:
    """Steps 1-2 of the module docstring as block attention problems (non-causal; any Nq, Nk).

    The stages are labelled for ``torch.profiler`` (``kdeformer.lsh_sort``, ``kdeformer.residual_sample``,
    ``kdeformer.gather``), which ``python -m kdeformer.benchmark --profile`` reports."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    device = q.device
    bucket_size = min(bucket_size, nk)  # one block holds every key: more would only be padding
    n_blocks = math.ceil(nk / bucket_size)
    q_block = math.ceil(nq / n_blocks)
    with record_function("kdeformer.lsh_sort"):
        projections = random_projections(d, num_bits, generator, accumulation_dtype(q.dtype), device)
        perm_k, perm_q = sort_by_bucket(k, projections), sort_by_bucket(q, projections)
        # padding indices point at row 0; padded keys are excluded by the bias, padded queries dropped by unsort
        perm_k_pad = F.pad(perm_k, (0, n_blocks * bucket_size - nk))
        perm_q_pad = F.pad(perm_q, (0, n_blocks * q_block - nq))
        inverse = torch.empty_like(perm_q).scatter_(-1, perm_q, torch.arange(nq, device=device).expand(b, h, nq))
    key_index = perm_k_pad.view(b, h, n_blocks, bucket_size)  # the keys each query block reads
    key_is_pad = (torch.arange(n_blocks * bucket_size, device=device) >= nk).view(n_blocks, bucket_size)
    bias = torch.zeros(n_blocks, bucket_size, dtype=accumulation_dtype(q.dtype), device=device).masked_fill(
        key_is_pad, float("-inf"))
    bias = bias.expand(b, h, n_blocks, bucket_size)
    if sample_size > 0 and n_blocks > 1:  # one block is all of A: nothing left to sample
        with record_function("kdeformer.residual_sample"):
            probs = residual_probabilities(v, generator)
            samples = torch.multinomial(probs.view(b * h, nk), sample_size, replacement=True,
                                        generator=generator).view(b, h, sample_size)
            key_block = torch.empty_like(perm_k).scatter_(
                -1, perm_k, (torch.arange(nk, device=device) // bucket_size).expand(b, h, nk))
            in_own_block = torch.gather(key_block, -1, samples).unsqueeze(2) == \
                torch.arange(n_blocks, device=device).view(n_blocks, 1)  # (B, H, nb, m)
            # weight 1 / (p_j m); probabilities and bias are in accumulation_dtype (float32 for half inputs)
            log_weight = -torch.log(torch.gather(probs, -1, samples) * sample_size)
            key_index = torch.cat([key_index, samples.unsqueeze(2).expand(b, h, n_blocks, sample_size)], dim=3)
            bias = torch.cat([bias, log_weight.unsqueeze(2).masked_fill(in_own_block, float("-inf"))], dim=3)
    with record_function("kdeformer.gather"):  # one gather each: the block's keys and the samples
        queries = gather_rows(q, perm_q_pad).view(b, h, n_blocks, q_block, d)
        keys, values = gather_rows(k, key_index), gather_rows(v, key_index)
    return KDEBlocks(queries, keys, values, bias.unsqueeze(3), inverse)


def kde_output(q, k, v, scale: float, num_bits: int, bucket_size: int, sample_size: int,
               generator: torch.Generator) -> torch.Tensor:
    """The KDEformer estimate N / D (non-causal), all blocks in one fused attention call; (B, H, Nq, Dv)."""
    blocks = kde_blocks(q, k, v, num_bits, bucket_size, sample_size, generator)
    b, h, nb, rows, d = blocks.queries.shape
    flat = lambda x: x.reshape(b * h, nb, x.shape[3], x.shape[4])
    with record_function("kdeformer.block_attention"):
        out = F.scaled_dot_product_attention(flat(blocks.queries), flat(blocks.keys), flat(blocks.values),
                                             attn_mask=flat(blocks.bias).to(q.dtype), scale=scale)
    with record_function("kdeformer.unsort"):
        return blocks.unsort(out.view(b, h, nb, rows, v.shape[-1]))


def kde_partial(q, k, v, scale: float, num_bits: int, bucket_size: int, sample_size: int,
                generator: torch.Generator) -> PartialSums:
    """The same estimate as :func:`kde_output` (same draws for the same generator state), kept as sums; logits,
    max-subtracted exponentials and sums in :func:`accumulation_dtype` (float32 for half-precision inputs)."""
    blocks = kde_blocks(q, k, v, num_bits, bucket_size, sample_size, generator)
    up = lambda t: t.to(accumulation_dtype(t.dtype))
    logits = torch.einsum("bhnqd,bhnkd->bhnqk", up(blocks.queries), up(blocks.keys)) * scale + up(blocks.bias)
    return from_logits(logits, up(blocks.values), "bhnqk,bhnkv->bhnqv").map_queries(blocks.unsort)


def exact_partial(q, k, v, scale: float, causal: bool) -> PartialSums:
    """Exact sums over all keys (causal: j <= i + Nk - Nq), in :func:`accumulation_dtype`."""
    up = lambda t: t.to(accumulation_dtype(t.dtype))
    logits = torch.matmul(up(q), up(k).transpose(-1, -2)) * scale
    if causal:
        logits = logits.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    return from_logits(logits, up(v))


@register("kdeformer")
class KDEformerAttention(AttentionMethod):
    """KDEformer attention (module docstring). Options: num_bits r (7), bucket_size (64), sample_size (64),
    min_seq_len (causal: diagonal chunks at most this long are exact; default 2 * bucket_size), seed.

    A bucket_size larger than the keys of a call (e.g. a short prompt while decoding) is clamped to Nk, which makes
    the call exact, and said once per instance (``warnings.warn``). sample_size may exceed Nk: the residual samples
    are drawn with replacement. Output dtype = input dtype; for bfloat16 / float16 inputs the fused path's softmax
    is the SDPA kernel's (max-subtracted, accumulated in float32) and everything else (probabilities, log-weights,
    the causal path's explicit sums) is computed in float32 (:func:`accumulation_dtype`).
    """

    randomized = True

    def __init__(self, num_bits: int = 7, bucket_size: int = 64, sample_size: int = 64,
                 min_seq_len: int | None = None, seed: int | None = None, check_finite: bool = True):
        super().__init__(seed=seed, check_finite=check_finite)
        self.num_bits = check_int(num_bits, "num_bits", "kdeformer", minimum=1)
        self.bucket_size = check_int(bucket_size, "bucket_size", "kdeformer", minimum=1)
        self.sample_size = check_int(sample_size, "sample_size", "kdeformer", minimum=0)
        self.min_seq_len = 2 * bucket_size if min_seq_len is None else check_int(
            min_seq_len, "min_seq_len", "kdeformer", minimum=1)
        self._warned_clamp = False

    def _options(self, device):
        return self.num_bits, self.bucket_size, self.sample_size, self.generator(device)

    def _warn_if_clamped(self, n_keys: int) -> None:
        if self.bucket_size > n_keys and not self._warned_clamp:
            self._warned_clamp = True
            warnings.warn(f"kdeformer: bucket_size={self.bucket_size} is larger than the number of keys Nk={n_keys}; "
                          "clamped to Nk (one block of all keys: exact). Said once per instance.", stacklevel=3)

    @classmethod
    def exact_options(cls, n_keys):
        """One LSH block holding every key is exact attention (no residual is left to sample), causal or not."""
        return {"bucket_size": n_keys, "sample_size": 0}

    def _causal(self, q, k, v, scale) -> PartialSums:
        """HyperAttention's recursive causal split of a square (n x n) mask, one batched call per level."""
        b, h, n, d = q.shape
        levels = max(0, math.ceil(math.log2(n / self.min_seq_len)))
        chunk = math.ceil(n / 2 ** levels)
        padded = chunk * 2 ** levels
        # zero rows at the end: padded keys are in every real query's future, so never read; padded queries dropped
        q, k, v = (F.pad(t, (0, 0, 0, padded - n)) for t in (q, k, v))
        fold = lambda t, parts: t.reshape(b, h * parts, padded // parts, t.shape[-1])
        leaves = exact_partial(fold(q, 2 ** levels), fold(k, 2 ** levels), fold(v, 2 ** levels), scale, True)
        parts = leaves.map_queries(lambda t: t.reshape(b, h, padded, t.shape[-1]))
        for level in range(levels):
            segments, half = 2 ** level, padded // 2 ** (level + 1)
            halves = lambda t, i: t.view(b, h, segments, 2, half, t.shape[-1])[:, :, :, i].reshape(
                b, h * segments, half, t.shape[-1])
            off = kde_partial(halves(q, 1), halves(k, 0), halves(v, 0), scale, *self._options(q.device))
            # the off-diagonal sums belong to the right halves; left halves get an empty piece
            off = off.map_queries(lambda t: t.view(b, h, segments, 1, half, t.shape[-1]))
            off = PartialSums.cat([PartialSums.empty(off.den.shape, v.shape[-1], like=off.num), off], dim=3)
            parts = parts.merge(off.map_queries(lambda t: t.reshape(b, h, padded, t.shape[-1])))
        return parts.map_queries(lambda t: t[:, :, :n])

    def attend(self, q, k, v, causal, scale):
        nq, nk = q.shape[2], k.shape[2]
        self._warn_if_clamped(nk)
        if not causal:
            return kde_output(q, k, v, scale, *self._options(q.device))
        parts = self._causal(q, k[:, :, nk - nq:], v[:, :, nk - nq:], scale)
        if nk > nq:  # keys before the first query's position are visible to every query
            parts = parts.merge(kde_partial(q, k[:, :, :nk - nq], v[:, :, :nk - nq], scale,
                                            *self._options(q.device)))
        return parts.output().to(q.dtype)

    @classmethod
    def budgets(cls, n_keys):
        root = max(8, 2 ** round(math.log2(math.sqrt(n_keys))))
        return [{"bucket_size": min(n_keys, f // 2), "sample_size": f} for f in (root, 2 * root, 4 * root)]
