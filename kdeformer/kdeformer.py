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
All blocks go through one fused call over index lists (:func:`common.indexed_attention.indexed_attention`: a
batched ``scaled_dot_product_attention`` over the gathered (B*H, blocks, rows, D) layout, or the Triton kernel that
reads the rows through the lists), so there is no Python loop over blocks or queries and the per-row max
subtraction of the fused softmax keeps float32 from overflowing; float64 inputs are computed in float64 (the error
experiments, torch kernel). :func:`kde_partial` gives the
same estimate as separate sums (numerator, normaliser; :class:`common.partial_sums.PartialSums`), mergeable with
other pieces, where the sums themselves are of interest (the unbiasedness test).

Causal attention (issue 13; the diagonal/off-diagonal split of HyperAttention, Han et al. 2023, Sec. 4, flattened
into ONE fused call so that causal costs about what non-causal costs; :func:`causal_kde_output`). The positions are
cut into diagonal chunks of ``chunk_size`` (C). The queries of a chunk are sorted by their LSH bucket and cut into
G = 4 groups of C / 4 (G = 2 or 1 when C is not divisible), so a group holds queries of one chunk with similar
codes. Each query of a chunk attends, in one SDPA call over all chunks, to

1. its own chunk's C keys, block-causal (key position <= query position): the diagonal tile, exact;
2. the chunk's LSH windows, one of ``bucket_size`` keys per group, from the strictly earlier chunks: the past keys
   sorted by (bucket, position), each window centred on the rank of its group's median query code among them,
   overlaps counted once; exact (every query reads all G windows: its own group's and the others');
3. the residual of the earlier chunks by stratified samples: every full chunk c' (a stratum) draws
   ceil(2 m / strata) keys with KDEformer's p_j ∝ ||v_j|| / ||V_c'||_op + 1/C normalised inside c', weight
   1 / (p_j m_c'); a query of chunk c reads the samples of the strata c' < c, minus those in the chunk's windows.
   Over the sequence a query reads about ``sample_size`` samples on average (the last ones 2 m, the first ones few,
   whose past is short), each stratum sampled at the same rate.

The sums over 1-3 are disjoint and 3 is unbiased for what 1-2 leave out of the query's past, as in the non-causal
case. Causality is exact by construction: the windows are rank ranges among past keys (computed from the counts of
keys per (chunk, code): in the (code, position) order the past keys of one code are the first ones of its segment,
so the r-th past key is found by a search over codes, and future keys change none of this), the strata lie before
the chunk, and their probabilities use their own values only; no key after a chunk is among its keys (inside the
chunk the mask hides the later ones), and changing any future key or value leaves earlier outputs bit-identical
(tested). The grouping depends on the codes of
later queries of the same chunk (as the query blocks of HyperAttention's and KDEformer's non-causal sort do). No
recursion: every part is one tile of the same call; with ``bucket_size >= Nk`` the window covers the whole past and
the call is exact causal attention. Nq < Nk (the queries are the last Nq positions) takes the same path; only the
chunks holding queries form tiles.

Layout (issue 13: on an H100 the gathers of keys and values per tile, then the per-row mask, were most of the time).
One tile per chunk: its C queries in position order against the keys [the G windows ; the samples ; padding ; the
chunk's own C keys], given as an index list with log-weights log w_j (0 for window and own keys, log 1 / (p_j m_c')
for a sample, -inf for a window slot already in an earlier window or beyond the past, for a sample in a window or of
a stratum not before the chunk, and for padding; a -inf slot holds the chunk's first key, which every query of the
chunk reads anyway, never a future key), the own chunk last and block-causal: one
:func:`common.indexed_attention.indexed_attention` call with ``diagonal=True`` computes
sum_j e^{s_ij} w_j v_j / sum_j e^{s_ij} w_j over every tile. Its ``kernel`` option (KDEformer's ``kernel``) picks
how: 'torch' gathers the tiles' keys and values once and makes one SDPA call with the weights on the values,
[w_j v_j, w_j], so that the only mask is one (C, L) block-causal pattern broadcast over chunks, heads and batch;
'triton' reads the keys and values through the index list inside a flash-attention kernel (nothing gathered, -inf
columns not read). The non-causal blocks go through the same call (``diagonal=False``, the log-weights as a bias).
Nothing of size (queries x keys) is materialised.

Memory (issue 13, n = 262,144 on one GPU): everything outside the tiles is O(Nk) per head; the tiles go through the
fused call a block of query chunks at a time (``query_block`` rows, by default about :data:`BLOCK_BYTES` of gathered
keys and values for the torch kernel, of index lists for the triton kernel), each block reading only the sample
columns of the strata before its last chunk. The key count L is
padded to a multiple of 16 (the mask width the fused CUDA kernels take without a padded copy) and the weighted values
to a multiple of 8 columns.

Precision: for bfloat16 / float16 the torch kernel rounds the weights to the input dtype with the values (about 0.4%
of a weight) and divides the SDPA output's two parts in float32; the triton kernel adds the log-weights to the
logits in float32.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from common.attention import AttentionMethod, causal_query_positions, gather_rows, output_and_lse
from common.indexed_attention import KERNELS, choose_kernel, indexed_attention
from common.partial_sums import PartialSums, from_logits
from common.registry import register
from common.validation import check_int

from .lsh import bucket_positions, random_projections, sort_by_bucket


GRAM_ROWS = 1024  # rows per partial Gram matrix (:func:`operator_norm`)


def operator_norm(v: torch.Tensor, iterations: int = 8, generator=None) -> torch.Tensor:
    """||V||_op of each (B, H) matrix V (N, Dv): power iteration x <- G x / ||G x|| on the Gram matrix
    G = V^T V (Dv x Dv, formed once, so each iteration costs Dv^2 instead of N Dv); ||V||_op = sqrt(x^T G x).

    G is summed from the Gram matrices of blocks of :data:`GRAM_ROWS` rows (zero rows pad the last): one batched
    product instead of a (Dv x N) @ (N x Dv) product per head, whose long inner dimension a GPU runs on few tiles
    (4 of the 13.5 ms of KDEformer's forward at n = 131,072 on an H100, before)."""
    rows = min(GRAM_ROWS, v.shape[-2])
    blocks = F.pad(v, (0, 0, 0, -v.shape[-2] % rows)).view(*v.shape[:-2], -1, rows, v.shape[-1])
    gram = (blocks.transpose(-1, -2) @ blocks).sum(-3)
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
    """The per-block attention problems of one KDEformer call (module docstring, "Implementation"), as index lists
    (:func:`common.indexed_attention.indexed_attention`).

    query_index (B, H, nb, Q): the LSH-sorted queries, Q = ceil(Nq / nb) rows per block (row 0 pads the last);
    key_index (B, H, nb, K): K = bucket_size LSH keys of the block, then the m samples;
    bias (B, H, nb, K): the log-weight added to each logit (0, log 1/(p_j m), or -inf = excluded), in
    :func:`accumulation_dtype` (the torch kernel's fused call rounds it to the input dtype: in bfloat16 a log-weight
    near log(n / m) ~ 3 keeps about 1% of relative precision in its weight; the triton kernel adds it in float32);
    inverse (B, H, Nq): the row of each original query in the flattened (nb * Q) block order.
    """
    query_index: torch.Tensor
    key_index: torch.Tensor
    bias: torch.Tensor
    inverse: torch.Tensor

    def unsort(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, H, nb, Q, ...) per-block rows -> (B, H, Nq, ...) in the original query order."""
        b, h, nb, nq_block = rows.shape[:4]
        flat = rows.reshape(b, h, nb * nq_block, math.prod(rows.shape[4:]))
        out = gather_rows(flat, self.inverse)
        return out.view(*out.shape[:3], *rows.shape[4:])


def kde_blocks(q, k, v, num_bits: int, bucket_size: int, sample_size: int, generator: torch.Generator) -> KDEBlocks:
    """Steps 1-2 of the module docstring as block attention problems (non-causal; any Nq, Nk): the index lists,
    nothing gathered.

    The stages are labelled for ``torch.profiler`` (``kdeformer.lsh_sort``, ``kdeformer.residual_sample``), which
    ``python -m kdeformer.benchmark --profile`` reports."""
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
    return KDEBlocks(perm_q_pad.view(b, h, n_blocks, q_block), key_index, bias, inverse)


def kde_output(q, k, v, scale: float, num_bits: int, bucket_size: int, sample_size: int,
               generator: torch.Generator, kernel: str = "auto") -> torch.Tensor:
    """The KDEformer estimate N / D (non-causal), all blocks in one fused attention call
    (:func:`common.indexed_attention.indexed_attention` with ``kernel``: 'torch' gathers the blocks' rows and calls
    SDPA, 'triton' reads them through the index lists); (B, H, Nq, Dv)."""
    blocks = kde_blocks(q, k, v, num_bits, bucket_size, sample_size, generator)
    with record_function("kdeformer.block_attention"):
        out = indexed_attention(q, k, v, blocks.key_index, blocks.bias, blocks.query_index, scale=scale,
                                kernel=kernel)
    with record_function("kdeformer.unsort"):
        return blocks.unsort(out)


def kde_partial(q, k, v, scale: float, num_bits: int, bucket_size: int, sample_size: int,
                generator: torch.Generator) -> PartialSums:
    """The same estimate as :func:`kde_output` (same draws for the same generator state), kept as sums; logits,
    max-subtracted exponentials and sums in :func:`accumulation_dtype` (float32 for half-precision inputs)."""
    blocks = kde_blocks(q, k, v, num_bits, bucket_size, sample_size, generator)
    up = lambda t: t.to(accumulation_dtype(t.dtype))
    queries, keys = gather_rows(q, blocks.query_index), gather_rows(k, blocks.key_index)
    logits = torch.einsum("bhnqd,bhnkd->bhnqk", up(queries), up(keys)) * scale + up(blocks.bias).unsqueeze(3)
    values = up(gather_rows(v, blocks.key_index))
    return from_logits(logits, values, "bhnqk,bhnkv->bhnqv").map_queries(blocks.unsort)


BLOCK_BYTES = 2 ** 33  # the working memory a block of the causal path aims at (:func:`rows_per_block`)
INDEX_BYTES = 64  # per index-list column: the index, its log-weight and the window search's int64 temporaries


def rows_per_block(batch_heads: int, width: int, tile_rows: int, row_dim: int, itemsize: int,
                   materialised: bool = True) -> int:
    """Query rows per block of :func:`causal_kde_output` so that the block takes about :data:`BLOCK_BYTES`: per row,
    a score row of ``width`` entries (the unfused CPU kernel's, in up to float64), and a 1 / ``tile_rows`` share of
    its chunk's ``width`` gathered keys, values and weighted values (``row_dim`` numbers each), their indices and
    weights. ``materialised=False`` (the triton kernel, which gathers nothing and keeps no score row): a
    1 / ``tile_rows`` share of :data:`INDEX_BYTES` per column."""
    per_column = 8 + (row_dim * itemsize + 12) / tile_rows if materialised else INDEX_BYTES / tile_rows
    return max(1, int(BLOCK_BYTES // (batch_heads * width * per_column)))


def causal_kde_output(q, k, v, scale: float, num_bits: int, bucket_size: int, sample_size: int, chunk_size: int,
                      generator: torch.Generator, query_block: int | None = None,
                      kernel: str = "auto") -> torch.Tensor:
    """Causal KDEformer (module docstring, "Causal attention"): diagonal chunks exact and block-causal, an LSH
    window of earlier keys, stratified residual samples of the earlier chunks, in one fused attention call per block
    of query chunks (:func:`common.indexed_attention.indexed_attention`, ``diagonal=True``, with ``kernel``);
    (B, H, Nq, Dv). The stages carry the same ``torch.profiler`` labels as :func:`kde_blocks`.

    Memory: everything before the block loop is O(Nk) per head (plus a (chunks x codes) count table: all 2^r
    codes, or the distinct ones when 2^r > 4 C); a block of ``query_block`` query rows (default: as many as keep its
    tiles' index lists, and for the torch kernel its gathered keys, values and mask, near :data:`BLOCK_BYTES`,
    :func:`rows_per_block`) is attended and written at a time."""
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    dev = q.device
    acc = accumulation_dtype(q.dtype)
    C = min(chunk_size, nk)
    K = min(bucket_size, nk)
    groups = next(g for g in (4, 2, 1) if C % g == 0)
    Q = C // groups
    first, last = (nk - nq) // C, (nk - 1) // C
    n_qc = last - first + 1
    chunk_start = (first + torch.arange(n_qc, device=dev)) * C  # (n_qc,) first key position of each query chunk
    with record_function("kdeformer.lsh_sort"):
        projections = random_projections(d, num_bits, generator, acc, dev)
        code_k, code_q = bucket_positions(k, projections), bucket_positions(q, projections)
        big = 2 ** num_bits  # code of an empty query slot: sorts last
        # query slots: (chunk, offset) of each query position; empty slots where no query is
        slot_of_query = causal_query_positions(nq, nk, dev) - first * C  # (Nq,) in [0, n_qc * C)
        slot_code = torch.full((b, h, n_qc * C), big, dtype=code_q.dtype, device=dev)
        slot_code[:, :, slot_of_query] = code_q
        sorted_code, order = torch.sort(slot_code.view(b, h, n_qc, C), dim=-1, stable=True)
        slot_pos = chunk_start.view(n_qc, 1) + order  # (B, H, n_qc, C) key-sequence position of each sorted slot
        slot_query = slot_pos - (nk - nq)  # query index; outside [0, Nq) for empty slots
        slot_valid = (slot_query >= 0) & (slot_query < nq) & (slot_pos < nk)
        n_valid = slot_valid.sum(-1, keepdim=True)  # >= 1 for every query chunk
        mid = torch.minimum(torch.arange(groups, device=dev) * Q + Q // 2, n_valid - 1)  # (B, H, n_qc, G)
        tile_code = torch.gather(sorted_code, -1, mid)
        # keys sorted by (code, position): the keys of one code form a segment in position order, so the keys of
        # that code before chunk c are the first past_by_code[c, code] of its segment
        perm_k = torch.sort(code_k, dim=-1, stable=True).indices
        # the codes that index the count table, sorted (dense code = index in it): all 2^r when the table stays within
        # 4 Nk entries per head (no host sync), else the distinct codes of the keys (torch.unique: a sync on CUDA)
        codes = torch.arange(big, device=dev) if big <= 4 * C else torch.unique(code_k)
        dense_k = torch.searchsorted(codes, code_k)
        n_codes, n_key_chunks = codes.numel(), math.ceil(nk / C)
        key_chunk = torch.arange(nk, device=dev) // C
        per_chunk = torch.zeros(b, h, n_key_chunks * n_codes, dtype=torch.long, device=dev).scatter_add_(
            -1, key_chunk * n_codes + dense_k, torch.ones_like(dense_k)).view(b, h, n_key_chunks, n_codes)
        segment = F.pad(per_chunk.sum(2).cumsum(-1), (1, 0))  # (B, H, codes + 1): sorted index where a code starts
        past_by_code = F.pad(per_chunk.cumsum(2), (0, 0, 1, 0))[:, :, first:first + n_qc]  # keys before chunk c
        past_below = F.pad(past_by_code.cumsum(-1), (1, 0))  # (B, H, n_qc, codes + 1): past keys of a lower code
        n_past = chunk_start.view(1, 1, n_qc, 1)  # keys before chunk c (all of them are past for its queries)
        tile_dense = torch.searchsorted(codes, tile_code.reshape(-1)).view(b, h, n_qc, groups)
        start = torch.gather(past_below, -1, tile_dense)  # rank among the past keys of the tile's code
        lo = torch.minimum((start - K // 2).clamp_min(0), (n_past - K).clamp_min(0))  # (B, H, n_qc, G)
    own = chunk_start.view(n_qc, 1) + torch.arange(C, device=dev)  # (n_qc, C) positions of each chunk's keys
    n_strata = last  # key chunks 0 .. last - 1 are full and lie before the last query chunk
    per = 0
    if sample_size > 0 and n_strata > 0:
        with record_function("kdeformer.residual_sample"):
            per = math.ceil(2 * sample_size / n_strata)  # a query reads sample_size of them on average
            probs = residual_probabilities(v[:, :, : n_strata * C].reshape(b, h * n_strata, C, dv), generator)
            # at least 2 draws: torch.multinomial checks its input on the host (a sync on CUDA) for a single draw
            local = torch.multinomial(probs.view(b * h * n_strata, C), max(per, 2), replacement=True,
                                      generator=generator)[:, :per]
            log_weight = -torch.log(torch.gather(probs.view(b * h * n_strata, C), -1, local) * per).view(
                b, h, n_strata * per)  # log 1 / (p_j m_c')
            stratum = torch.arange(n_strata, device=dev).repeat_interleave(per)  # (M,), in increasing order
            samples = (local.view(b, h, n_strata, per) + (torch.arange(n_strata, device=dev) * C).view(-1, 1)).view(
                b, h, n_strata * per)
            rank_s = torch.empty_like(perm_k).scatter_(-1, perm_k, torch.arange(nk, device=dev).expand(b, h, nk))
            sample_code = torch.gather(dense_k, -1, samples)  # (B, H, M)
            sample_offset = torch.gather(rank_s, -1, samples) - torch.gather(segment, -1, sample_code)
    out = torch.empty(b, h, n_qc * C, dv, dtype=q.dtype, device=dev)
    use = choose_kernel(kernel, q, k, v)
    dv_pad = dv + 1 + (-(dv + 1) % 8)  # the torch kernel's weighted values [w v, w, 0...] (indexed_attention)
    rows = query_block or rows_per_block(b * h, groups * K + per * n_strata + C, C, d + 2 * dv_pad, q.element_size(),
                                         materialised=use == "torch")
    block = max(1, rows // C)  # query chunks per block
    for c0 in range(0, n_qc, block):
        c1 = min(n_qc, c0 + block)
        nc, sl = c1 - c0, slice(c0, c1)
        safe = chunk_start[sl].view(1, 1, nc, 1)  # the chunk's first key: read by all its queries, never future
        # a window holds at most the past of the block's last chunk: slots beyond it would all be empty
        width = min(K, (first + c1 - 1) * C)
        with record_function("kdeformer.lsh_sort"):  # the windows: ranks lo .. lo + K - 1 among the past keys
            lo_blk = lo[:, :, sl]  # (B, H, nc, G), non-decreasing in the group (groups follow the code order)
            ranks = lo_blk.unsqueeze(-1) + torch.arange(width, device=dev)  # (B, H, nc, G, width)
            earlier_end = F.pad(lo_blk[..., :-1] + K, (1, 0))  # where the previous group's window ends
            fresh = (ranks < n_past[:, :, sl].unsqueeze(-1)) & (ranks >= earlier_end.unsqueeze(-1))
            below = past_below[:, :, sl]
            code_of = torch.searchsorted(below[..., 1:].contiguous(), ranks.view(b, h, nc, groups * width),
                                         right=True).clamp_max(n_codes - 1)
            where = torch.gather(segment, -1, code_of.view(b, h, -1)).view(b, h, nc, groups * width) + \
                ranks.view(b, h, nc, groups * width) - torch.gather(below, -1, code_of)
            window = torch.gather(perm_k, -1, where.clamp(0, nk - 1).view(b, h, -1)).view(b, h, nc, groups * width)
            fresh = fresh.view(b, h, nc, groups * width)
        keys_index, log_weights = [torch.where(fresh, window, safe)], [torch.where(fresh, 0.0, -math.inf).to(acc)]
        m_used = min(n_strata, first + c1 - 1) * per  # the strata before the block's last chunk
        if m_used > 0:
            with record_function("kdeformer.residual_sample"):
                cols = slice(0, m_used)
                past_rank = torch.gather(below[..., :-1], -1, sample_code[:, :, cols].unsqueeze(2).expand(
                    b, h, nc, m_used)) + sample_offset[:, :, cols].unsqueeze(2)  # (B, H, nc, M): rank among past keys
                in_windows = ((past_rank.unsqueeze(3) >= lo_blk.unsqueeze(-1)) &
                              (past_rank.unsqueeze(3) < lo_blk.unsqueeze(-1) + K)).any(3)
                usable = (stratum[cols] * C < chunk_start[sl].view(nc, 1)) & ~in_windows  # (B, H, nc, M)
                keys_index.append(torch.where(usable, samples[:, :, cols].unsqueeze(2), safe))
                log_weights.append(torch.where(usable, log_weight[:, :, cols].unsqueeze(2), -math.inf))
        pad = -(sum(x.shape[-1] for x in log_weights) + C) % 16  # a mask width the fused kernels take as it is
        keys_index += [safe.expand(b, h, nc, pad), own[sl].clamp_max(nk - 1).expand(b, h, nc, C)]
        log_weights += [torch.full((1, 1, 1, 1), -math.inf, dtype=acc, device=dev).expand(b, h, nc, pad),
                        torch.zeros(1, 1, 1, 1, dtype=acc, device=dev).expand(b, h, nc, C)]
        # the windows, the samples, padding, the own chunk (block-causal, last): (B, H, nc, L)
        index, lw = torch.cat(keys_index, dim=-1), torch.cat(log_weights, dim=-1)
        q_rows = (own[sl] - (nk - nq)).clamp(0, nq - 1).view(1, 1, nc, C)
        with record_function("kdeformer.block_attention"):
            o = indexed_attention(q, k, v, index, lw, q_rows, diagonal=True, scale=scale, kernel=use)
            out[:, :, c0 * C:c1 * C] = o.view(b, h, nc * C, dv)
    with record_function("kdeformer.unsort"):
        return out[:, :, slot_of_query]


@register("kdeformer")
class KDEformerAttention(AttentionMethod):
    """KDEformer attention (module docstring). Options: num_bits r (7), bucket_size (64), sample_size (64),
    chunk_size (causal: the exact block-causal diagonal chunks; default bucket_size), query_block (causal: query rows
    per fused call, rounded down to whole chunks; default None: about :data:`BLOCK_BYTES` of working memory per call,
    so that memory grows like Nk (D + Dv) whatever the budget), kernel ('auto' | 'torch' | 'triton': how the tiles
    are attended, :mod:`common.indexed_attention`; 'auto' = the Triton kernel for CUDA inputs it supports when no
    gradient is needed, else torch; the same draws give the same estimate either way), seed.

    A bucket_size larger than the keys of a call (e.g. a short prompt while decoding) is clamped to Nk, which makes
    the call exact, and said once per instance (``warnings.warn``). sample_size may exceed Nk: the residual samples
    are drawn with replacement. Output dtype = input dtype; for bfloat16 / float16 inputs the fused path's softmax
    is the SDPA kernel's (max-subtracted, accumulated in float32) and everything else (probabilities, log-weights,
    the causal path's explicit sums) is computed in float32 (:func:`accumulation_dtype`).
    """

    randomized = True
    supports_lse = True

    def __init__(self, num_bits: int = 7, bucket_size: int = 64, sample_size: int = 64,
                 chunk_size: int | None = None, query_block: int | None = None, kernel: str = "auto",
                 seed: int | None = None, check_finite: bool = True):
        super().__init__(seed=seed, check_finite=check_finite)
        self.num_bits = check_int(num_bits, "num_bits", "kdeformer", minimum=1)
        self.bucket_size = check_int(bucket_size, "bucket_size", "kdeformer", minimum=1)
        self.sample_size = check_int(sample_size, "sample_size", "kdeformer", minimum=0)
        self.chunk_size = self.bucket_size if chunk_size is None else check_int(
            chunk_size, "chunk_size", "kdeformer", minimum=1)
        self.query_block = None if query_block is None else check_int(query_block, "query_block", "kdeformer",
                                                                       minimum=1)
        if kernel not in KERNELS:
            raise ValueError(f"kdeformer: kernel must be one of {KERNELS}, got {kernel!r}")
        self.kernel = kernel
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

    def attend(self, q, k, v, causal, scale):
        self._warn_if_clamped(k.shape[2])
        if causal:
            return causal_kde_output(q, k, v, scale, self.num_bits, self.bucket_size, self.sample_size,
                                     self.chunk_size, self.generator(q.device), self.query_block, self.kernel)
        return kde_output(q, k, v, scale, *self._options(q.device), kernel=self.kernel)

    def attend_lse(self, q, k, v, causal, scale):
        """(out, log of the estimated normaliser) for ``return_lse=True``, from :func:`kde_partial` (the same
        estimate as sums); non-causal only: the causal path's fused attention keeps no normaliser."""
        if causal:
            raise ValueError("kdeformer: return_lse=True is not supported with causal=True (the causal path's fused "
                             "attention keeps no normaliser); use it non-causal")
        self._warn_if_clamped(k.shape[2])
        return output_and_lse(kde_partial(q, k, v, scale, *self._options(q.device)), q.dtype)

    @classmethod
    def budgets(cls, n_keys):
        root = max(8, 2 ** round(math.log2(math.sqrt(n_keys))))
        return [{"bucket_size": min(n_keys, f // 2), "sample_size": f} for f in (root, 2 * root, 4 * root)]
