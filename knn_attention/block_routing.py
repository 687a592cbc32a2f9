"""kNN attention by query blocks routed to key blocks: the on-device inverted file (``index='ivf_blocks'``;
Haris 2024, Sec. 4, estimators (a) and (b) of ``forward_pass``).

``ivf_blocked.py`` (``ivf_blas``) evaluates kNN attention cell by cell on a CPU: one BLAS call per k-means cell.
On a GPU thousands of small calls of data-dependent size are slow and read sizes back to the host, so this module
keeps every shape static and spends the work in one fused attention kernel
(``torch.nn.functional.scaled_dot_product_attention``, flash-style, accumulating in float32) over gathered blocks:

1. cells (``device_index.kmeans``): ``iterations`` Lloyd steps of k-means with ``nlist`` centroids on a subsample
   of ``points_per_centroid`` keys per centroid (drawn from a stream seeded by the method's ``seed``: the same
   cells at every call); every key joins its nearest centroid (L2), every query the centroid of largest cosine
   (the probe rule of ``ivf_blas``);
2. blocks: keys are sorted by (cell, position), each cell padded to whole key blocks of ``block`` keys (a block
   never mixes cells: a block that straddled two cells would be routed by a mean that fits neither); queries are
   sorted and cut into query blocks the same way, so a query block holds queries of one cell, which want the same
   keys. The padding is bounded statically (``device_index._group_into_chunks``: at most nlist (block - 1) slots);
3. routing: query block b takes the ``nprobe`` key blocks B with the largest (sum of its queries) . (unit mean of
   B's keys); its exact set S_b is their keys (up to ``nprobe * block``). Causal attention has two layouts
   (``causal_layout``):

   * ``'segments'`` (the default): positions are cut into segments of L = ``causal_block`` tokens (default
     :func:`default_segment`, about Nk / 16). Queries are blocked within their segment by coarse cell (L / (4
     block) k-means groups of the centroids, each group of a segment padded to whole blocks, then ordered by cell
     and position: a block holds one kind of query; the static padding bound adds at most a quarter of the query
     blocks), and only the keys *before* the query block's segment
     are routed: S_b is the keys of its chosen blocks before the segment, the draws of step 4 come from the keys
     before the segment outside S_b. The keys of the query's own segment up to its position join S_i exactly
     (as the own block of the per-query causal indexes, ``index.causal_top_k_indices``). Every routed key is
     visible to every query of the block, so the routed call needs no position mask, and the own segments are one
     batched causal call over L x L tiles; the two parts are merged by their log-sum-exps
     (:func:`local_attention`, :func:`attention_lse`). Estimator (b) with this S_i: same definition as the
     per-query indexes' causal path (own block exact, earlier blocks retrieved, tail from the rest of the prefix).
   * ``'mask'`` (the earlier layout, kept for comparison): query blocks as in the non-causal case; a key block
     whose every key lies after every query of b is never chosen, S_b also holds the first ``block`` keys (a sink)
     and the keys at b's own queries' positions, and an additive position mask removes, per query, every key after
     it (the memory-efficient kernel runs: slower, and the mask costs as much memory traffic as the keys);
4. tail (estimator (b), ``num_samples`` = l > 0), by importance sampling over the key blocks outside S_b: a draw
   picks block B with probability p_B, then one of its |B| keys uniformly, and weighs |B| / (l p_B) (the inverse
   of its probability, times 1 / l), so that for every query i

       E[ sum_s w_s [j_s allowed for i, j_s not in S_b] e^{s_i j_s} v_{j_s} ] = sum_{j in T_i} e^{s_ij} v_j,

   T_i = P_i \\ S_b: the unbiased tail sum of estimator (b) of ``forward_pass``. p_B mixes the block-level softmax
   softmax_B(S qbar_b . kbar_B + log |B|) (where the remaining mass lies, qbar, kbar block means) with the
   uniform |B| / sum |B| (weight ``tail_uniform`` = 1/4, which bounds every weight by 4 times the uniform one);
   with q = 0 it is the uniform draw of estimator (b), weight |T| / l (tested). The l draws are shared by the
   block's queries, as ``ivf_blas`` shares them by ``tail_block``; a draw of a sink or own key drops out.
5. attention: every query block attends its W gathered keys (S_b, sink and own keys, draws, padded to a multiple
   of 16) in one batched attention call per chunk, the weights entering as two extra head dimensions (0 for S_b,
   log w_s for a draw, a huge negative number for a dropped draw, a key not allowed or padding), so that the
   flash kernel runs without a mask; only the ``'mask'`` layout (and float16, non-causal) pass an additive mask.
   Non-causal without autograd, when triton imports and the head sizes suit it (CUDA; 16, 32, 64 or 128), the
   query blocks instead read their keys through ``common.indexed_attention``'s Triton kernel: no gathered copy of
   the keys and values (the gathers were most of the time on an H100), the log weights added in float32.
   The softmax over that row is exactly N_i / D_i of estimator (b) (or (a) without draws), merged with the own
   segment's exact sums in the ``'segments'`` layout; outputs are put back in query order.

With ``nprobe`` >= the number of key blocks every key is in S_b, no draw is made (none is outside S_b), and the
result is exact attention (tested). Cost per head: k-means O(iterations points_per_centroid nlist^2 D),
assignment O((Nq + Nk) nlist D), routing O(Nq Nk D / block^2), attention O(Nq W D) with W = nprobe block + l
(+ 2 block), all dense and batched over B H and the query blocks; memory is bounded by attending the query blocks
in chunks. No value is read back to the host: every shape follows from the input shapes and the options.

Precision: scores, exponentials and sums are float32 inside the attention kernel for every input dtype; the mask is
in the input dtype, so in bfloat16 a draw's log weight (about log(Nk / l)) is rounded to 8 significant bits (a
relative weight error below 2^-9 |log w|, about 1.2% at w = 512, the size of bfloat16 rounding of the scores).
The index is built in float32 (float64 for float64 inputs) from detached inputs; autograd differentiates the
attention with the routing (cells, blocks, draws and their weights) held fixed (tested with gradcheck).

Causal: no future key or value is ever read (weight exactly 0), but the cells and blocks are built from all keys,
so which past keys a query reads depends on future keys (as with Reformer's buckets; ``ivf`` / ``ivf_torch`` refuse
causal for that reason, this index accepts it and says so). Cost of the ``'segments'`` layout over the non-causal
call: the own segments, Nq L / 2 exact scores per head (about 1/16 of exact causal attention at the default L), and
the query blocks padded per segment and coarse cell (at most a quarter more).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.attention import attention_with_lse, causal_query_positions
from common.indexed_attention import triton_indexed_attention, triton_supports
from common.partial_sums import PartialSums
from common.validation import check_int

from .device_index import _group_into_chunks, _nearest_centroid, _score_dtype, kmeans, unit

# Query blocks are attended in chunks whose mask holds about this many numbers.
_CHUNK_ELEMENTS = 2 ** 28
# The width of every query block's key list is padded to a multiple of this (the alignment the fused kernels want).
_ALIGN = 16
# 'segments': causal without a mask (past segments routed, the own segment exact); 'mask': the position mask
CAUSAL_LAYOUTS = ("segments", "mask")


@dataclass(frozen=True)
class BlockOptions:
    """The options of ``ivf_blocks`` for Nk keys (see :func:`block_options`)."""
    nlist: int
    nprobe: int
    block: int
    num_samples: int
    segment: int = 0
    iterations: int = 4
    points_per_centroid: int = 32
    tail_uniform: float = 0.25


def default_segment(n_keys: int, block: int) -> int:
    """The causal segment L of the ``'segments'`` layout for Nk keys: the power of two nearest Nk / 16 (the exact
    local part then costs about 1/16 of exact causal attention), at least 64 blocks (a segment holds L / (4 block)
    >= 16 query groups of whole blocks: shorter segments mix kinds of queries in a block and route worse)."""
    return max(64 * block, 1 << max(0, round(math.log2(max(1, n_keys / 16)))))


def block_options(n_keys: int, nlist: int | None = None, nprobe: int | None = None, block: int | None = None,
                  num_samples: int | None = None, segment: int | None = None,
                  causal_layout: str = "segments") -> BlockOptions:
    """Defaults for Nk keys, r = ceil(sqrt(Nk)): block = the power of two >= r / 2, clamped to [8, 128];
    nlist = ceil(r / 2) cells (about 2 r keys each); nprobe = ceil(4 r / block) key blocks (|S_b| about 4 r keys,
    the largest of ``knn``'s declared k); num_samples = r (0: no tail, estimator (a)); the causal layout
    ``'segments'`` with segment L = ``segment`` or :func:`default_segment`, or ``'mask'`` (segment 0)."""
    root = math.ceil(math.sqrt(n_keys))
    block = (min(128, max(8, 1 << max(0, math.ceil(root / 2) - 1).bit_length())) if block is None
             else check_int(block, "cell_size", "knn", minimum=1))
    nlist = max(1, math.ceil(root / 2)) if nlist is None else check_int(nlist, "nlist", "knn", minimum=1)
    nprobe = math.ceil(4 * root / block) if nprobe is None else check_int(nprobe, "nprobe", "knn", minimum=1)
    num_samples = root if num_samples is None else check_int(num_samples, "num_samples", "knn", minimum=0)
    if causal_layout not in CAUSAL_LAYOUTS:
        raise ValueError(f"knn: causal_layout must be one of {CAUSAL_LAYOUTS}, got {causal_layout!r}")
    if causal_layout == "mask":
        if segment is not None:
            raise ValueError("knn: causal_block (the segment of index='ivf_blocks') needs causal_layout='segments'")
        segment = 0
    else:
        segment = default_segment(n_keys, block) if segment is None else check_int(segment, "causal_block", "knn",
                                                                                     minimum=1)
    return BlockOptions(nlist=nlist, nprobe=nprobe, block=block, num_samples=num_samples, segment=segment)


@dataclass
class Routing:
    """What each query block reads, for G = B H heads and Q query blocks of ``block`` queries:

    ``query_ids`` (G, Q, block) the block's query ids (-1 pads); ``query_slot`` (G, Nq) where each query sits in
    ``query_ids`` viewed as (G, Q block); ``query_pos`` (G, Q, block) their causal
    positions p_i (Nk for pads, which may read everything; their rows are discarded); ``key_ids`` (G, Q, W) the
    key ids the block attends (-1 pads); ``bias`` (G, Q, W) float32 log weight of each: 0 (exact), log w (a tail
    draw, step 4), -inf (a dropped draw, a sink or own key already in S_b, a key of the own or a later segment,
    a pad); ``key_blocks`` (G, K, block) the key ids of every key block (-1 pads) and ``chosen`` (G, Q, nprobe)
    the key blocks of S_b: ``key_ids`` starts with those blocks' ids, then the rest (sink, own keys, draws) padded
    to whole blocks; ``segment`` the causal segment L of the ``'segments'`` layout (0: the mask layout or not
    causal)."""
    query_ids: torch.Tensor
    query_slot: torch.Tensor
    query_pos: torch.Tensor
    key_ids: torch.Tensor
    bias: torch.Tensor
    key_blocks: torch.Tensor
    chosen: torch.Tensor
    segment: int = 0


def _segment_query_blocks(query_cell: torch.Tensor, group: torch.Tensor, n_groups: int, block: int):
    """Query blocks of the ``'segments'`` layout: queries (G, Nq) ordered by (group, cell, position) and cut into
    blocks that never straddle two groups (each group, a coarse cell within a segment, padded to whole blocks; a
    block may hold several cells of its group). Returns (slots (G, S) query ids with -1 pads, group of each block
    (G, S / block), slot of each query)."""
    by_cell = torch.argsort(query_cell, dim=-1, stable=True)
    slots, block_group, dest = _group_into_chunks(group.gather(1, by_cell), n_groups, block)
    slots = torch.where(slots >= 0, by_cell.gather(1, slots.clamp_min(0)), -1)
    return slots, block_group, torch.empty_like(dest).scatter_(1, by_cell, dest)


@torch.no_grad()
def route(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float, opts: BlockOptions,
          generator: torch.Generator | None, index_generator: torch.Generator | None = None) -> Routing:
    """Steps 1-4 of the module docstring for q (B, H, Nq, D), k (B, H, Nk, D); ``index_generator`` (on q's
    device) draws the k-means subsample, ``generator`` the tail (both ``generator`` when the former is None)."""
    b, h, nq, d = q.shape
    nk, g, dev = k.shape[2], b * h, q.device
    segmented = causal and opts.segment > 0
    dtype = _score_dtype(q.dtype)
    keys = k.detach().reshape(g, nk, d).to(dtype)
    queries = q.detach().reshape(g, nq, d).to(dtype)
    centroids = kmeans(keys, opts.nlist, opts.iterations, opts.points_per_centroid, index_generator or generator)
    nlist = centroids.shape[1]
    # keys and queries sorted by (cell, position), each cell padded to whole blocks: a block never mixes cells
    # bfloat16 inputs join their cells by bfloat16 GEMMs (float32 accumulation; a near tie may go either way, which
    # only moves a key between two near-equal cells): a quarter of the float32 GEMM's time on a GPU
    low = torch.bfloat16 if q.dtype == torch.bfloat16 else dtype
    key_cell = _nearest_centroid(k.detach().reshape(g, nk, d).to(low), centroids.to(low))
    query_cell = _nearest_centroid(q.detach().reshape(g, nq, d).to(low), unit(centroids).to(low))
    key_slots, _, key_slot_of = _group_into_chunks(key_cell, nlist, opts.block)
    query_positions = causal_query_positions(nq, nk, dev)
    if segmented:  # query blocks within one segment each, ordered by cell inside it
        n_segments = -(-nk // opts.segment)
        # query groups: coarse cells (k-means of the centroids) within a segment, each padded to whole blocks
        n_coarse = max(1, min(nlist, opts.segment // (4 * opts.block)))
        coarse = _nearest_centroid(centroids, kmeans(centroids, n_coarse, opts.iterations, opts.points_per_centroid,
                                                     index_generator or generator))
        group = (query_positions // opts.segment).expand(g, nq) * n_coarse + coarse.gather(1, query_cell)
        query_slots, block_group, query_slot = _segment_query_blocks(query_cell, group, n_segments * n_coarse,
                                                                     opts.block)
        block_segment = block_group // n_coarse
    else:
        query_slots, _, query_slot = _group_into_chunks(query_cell, nlist, opts.block)
    key_blocks, query_ids = key_slots.view(g, -1, opts.block), query_slots.view(g, -1, opts.block)
    n_key_blocks = key_blocks.shape[1]
    query_sum = _block_sums(queries, query_slot, opts.block, query_ids.shape[1])  # (G, Q, D)
    key_sum = _block_sums(keys, key_slot_of, opts.block, n_key_blocks)  # (G, K, D)
    sizes = (key_blocks >= 0).sum(-1)  # (G, K) keys per block; 0: an unused block
    score = query_sum @ unit(key_sum).transpose(1, 2)  # (G, Q, K)
    score = score.masked_fill((sizes == 0).unsqueeze(1), float("-inf"))
    positions = query_positions[query_ids.clamp_min(0)].masked_fill(query_ids < 0, nk)
    first_key = torch.where(key_blocks >= 0, key_blocks, nk).amin(-1)  # (G, K): the blocks' keys sorted by position
    if segmented:  # only keys before the query block's segment are routed: a block starting later is never chosen
        segment_start = (block_segment * opts.segment).unsqueeze(-1)  # (G, Q, 1)
        ineligible = first_key.unsqueeze(1) >= segment_start
        score = score.masked_fill(ineligible, float("-inf"))
    elif causal:  # a key block after every query of the query block is never chosen
        last_query = torch.where(query_ids >= 0, positions, -1).amax(-1)
        score = score.masked_fill(first_key.unsqueeze(1) > last_query.unsqueeze(2), float("-inf"))
    chosen = score.topk(min(opts.nprobe, n_key_blocks), dim=-1).indices  # (G, Q, nprobe)
    n_query_blocks, width = chosen.shape[1], chosen.shape[2] * opts.block
    selected = torch.zeros(g, n_query_blocks, n_key_blocks, dtype=torch.bool, device=dev).scatter_(2, chosen, True)
    block_of_key = key_slot_of // opts.block
    def in_selected(ids):  # (G, Q, m) key ids >= 0 -> is the key in S_b
        blocks = block_of_key.gather(1, ids.reshape(g, -1)).view_as(ids)
        return selected.gather(2, blocks)

    exact = key_blocks.gather(1, chosen.reshape(g, -1, 1).expand(-1, -1, opts.block)).view(g, n_query_blocks, width)
    dropped = (exact < 0) | (exact >= segment_start) if segmented else exact < 0
    ids, bias = [exact], [torch.zeros(exact.shape, device=dev).masked_fill(dropped, float("-inf"))]
    sink = min(opts.block, nk) if causal and not segmented else 0
    if sink:  # the first keys (the sink) and the keys at the block's own positions join S_b exactly
        first = torch.arange(sink, device=dev).expand(g, n_query_blocks, sink)
        first = first.masked_fill(in_selected(first), -1)
        own = torch.where(query_ids >= 0, positions, -1)
        own = own.masked_fill((own < sink) | in_selected(own.clamp_min(0)), -1)
        ids += [first, own]
        bias += [torch.zeros(t.shape, device=dev).masked_fill(t < 0, float("-inf")) for t in (first, own)]
    if opts.num_samples:
        query_mean = query_sum / (query_ids >= 0).sum(-1, keepdim=True).clamp_min(1)
        draws, log_weight = _draw_tail(query_mean, key_blocks, key_sum, sizes,
                                       selected | ineligible if segmented else selected, scale, opts, generator)
        drop = torch.isinf(log_weight) | (draws < sink)
        if segmented:  # a draw in the own segment (exact) or later
            drop |= draws >= segment_start
        elif causal:  # a draw of an own key is in S_b too
            own_sorted = own.sort(-1).values
            at = torch.searchsorted(own_sorted, draws).clamp_max(own_sorted.shape[-1] - 1)
            drop |= own_sorted.gather(-1, at) == draws
        ids.append(draws)
        bias.append(log_weight.masked_fill(drop, float("-inf")))
    # the rest (sink, own keys, draws) padded to whole blocks, so that attention gathers whole blocks
    rest_ids, rest_bias = torch.cat(ids[1:] or [exact[..., :0]], -1), torch.cat(bias[1:] or [bias[0][..., :0]], -1)
    pad = _rest_width(rest_ids.shape[-1], width, opts.block) - rest_ids.shape[-1]
    return Routing(query_ids=query_ids, query_slot=query_slot, query_pos=positions,
                   key_ids=torch.cat([exact, F.pad(rest_ids, (0, pad), value=-1)], -1),
                   bias=torch.cat([bias[0], F.pad(rest_bias, (0, pad), value=float("-inf"))], -1),
                   key_blocks=key_blocks, chosen=chosen, segment=opts.segment if segmented else 0)


def _rest_width(n_rest: int, exact_width: int, block: int) -> int:
    """The smallest width >= n_rest made of whole blocks with exact_width + width a multiple of ``_ALIGN``."""
    width = -(-n_rest // block) * block
    for _ in range(_ALIGN):  # block (a power of two or any int) reaches the alignment within _ALIGN steps
        if (exact_width + width) % _ALIGN == 0:
            return width
        width += block
    raise ValueError(f"knn: block={block} cannot align the key list to {_ALIGN}")


def _block_sums(x: torch.Tensor, slot: torch.Tensor, block: int, n_blocks: int) -> torch.Tensor:
    """(G, n_blocks, D) sums of the rows of x (G, n, D) by block, row i sitting at ``slot[:, i]`` (one index_add_)."""
    g, n, d = x.shape
    index = slot // block + (torch.arange(g, device=x.device) * n_blocks).unsqueeze(1)
    return x.new_zeros(g * n_blocks, d).index_add_(0, index.reshape(-1), x.reshape(-1, d)).view(g, n_blocks, d)


def _draw_tail(query_mean, key_blocks, key_sum, sizes, selected, scale: float, opts: BlockOptions,
               generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4: l draws per query block from the keys outside S_b, (key ids, log weights) each (G, Q, l), given
    the query blocks' mean query (G, Q, D), the key blocks (G, K, block), their key sums (G, K, D) and sizes (G, K)
    and S_b as a mask over key blocks (G, Q, K).

    A draw picks key block B with probability p_B (0 for the blocks of S_b and unused blocks), then one of its
    |B| keys uniformly: key j is drawn with probability p_B / |B| and weighted |B| / (l p_B), the inverse, so the
    weighted sum is unbiased for the sum over the keys outside S_b (a -inf log weight when there is none).
    p_B = (1 - a) softmax_B(S qbar_b . kbar_B + log |B|) + a |B| / sum |B| with a = ``tail_uniform``: the
    block-level softmax estimates where the remaining mass lies (qbar, kbar the block means), the uniform share
    keeps every weight below sum |B| / (a l)."""
    g, n_query_blocks, block = selected.shape[0], selected.shape[1], key_blocks.shape[-1]
    outside = (~selected) & (sizes > 0).unsqueeze(1)  # (G, Q, K)
    key_mean = key_sum / sizes.clamp_min(1).unsqueeze(-1)
    logits = (scale * query_mean @ key_mean.transpose(1, 2) + sizes.clamp_min(1).log().unsqueeze(1)).masked_fill(
        ~outside, float("-inf"))
    mass = torch.softmax(logits, -1).nan_to_num(0.0)  # a query block with nothing outside: all zero
    size_share = sizes.unsqueeze(1) * outside
    uniform = size_share / size_share.sum(-1, keepdim=True).clamp_min(1)
    proposal = (1 - opts.tail_uniform) * mass + opts.tail_uniform * uniform
    cdf = proposal.cumsum(-1)
    u = torch.rand(g, n_query_blocks, opts.num_samples, generator=generator, device=cdf.device, dtype=cdf.dtype)
    chosen = torch.searchsorted(cdf, u * cdf[..., -1:]).clamp_max(cdf.shape[-1] - 1)
    chosen_size = sizes.unsqueeze(1).expand_as(outside).gather(2, chosen)
    within = (torch.rand(chosen.shape, generator=generator, device=cdf.device) * chosen_size).long()
    slot = chosen * block + torch.minimum(within, (chosen_size - 1).clamp_min(0))
    draws = key_blocks.reshape(g, -1).gather(1, slot.reshape(g, -1)).view_as(slot)
    p = proposal.gather(2, chosen)
    log_weight = (chosen_size / (opts.num_samples * p)).log()
    return draws, log_weight.masked_fill((p <= 0) | (draws < 0), float("-inf"))


def _flat_rows(x: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, C) -> (B H N + 1, C): the rows laid end to end plus a zero row (the pad target)."""
    return torch.cat([x.reshape(-1, x.shape[-1]), x.new_zeros(1, x.shape[-1])])


def _flat_index(ids: torch.Tensor, n: int) -> torch.Tensor:
    """Ids (G, ...) in [0, n) or -1 -> rows of :func:`_flat_rows` (G n for -1)."""
    g = ids.shape[0]
    base = (torch.arange(g, device=ids.device) * n).view(g, *([1] * (ids.dim() - 1)))
    return torch.where(ids >= 0, ids + base, g * n)


def _augmented(x: torch.Tensor, width: int, fill: float | None = None) -> torch.Tensor:
    """x (B, H, N, C) -> (B H N + 1, width) rows: x, then two columns ``fill`` (zeros if None), then zeros; the
    last row (the pad target of :func:`_flat_index`) all zeros."""
    rows = x.reshape(-1, x.shape[-1])
    out = rows.new_zeros(rows.shape[0] + 1, width)  # written once (no concatenated copies)
    out[:-1, :rows.shape[1]] = rows
    if fill is not None:
        out[:-1, rows.shape[1]:rows.shape[1] + 2] = fill
    return out


# A dropped key's weight column: finite (an infinite one would make 0 * inf = nan in the kernels' backward),
# and far below any score: exp(-1e30 + s) is exactly 0 in float32 for any |s| < 1e29.
_DROPPED = -1e30


def _split(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., W) float32 log weights -> (..., W, 2) in ``dtype``, hi + lo = bias to float32 precision (-inf:
    ``_DROPPED``, 0), so a product with (c, c) adds c * bias to a score with the float32 accumulation of the
    kernel."""
    dropped = torch.isinf(bias)
    hi = bias.masked_fill(dropped, _DROPPED).to(dtype)
    lo = torch.where(dropped, 0.0, bias - hi.float()).to(dtype)
    return torch.stack([hi, lo], -1)


def _sdpa(q, k, v, mask, scale):
    """``scaled_dot_product_attention``; with a mask on CUDA the memory-efficient kernel is asked for first (the
    fused kernel that takes an additive mask), and if it cannot run, SDPA's own choice (with a warning)."""
    if mask is not None and q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        try:
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        except RuntimeError as err:
            warnings.warn(f"knn: ivf_blocks could not use the memory-efficient attention kernel ({err}); "
                          "falling back to SDPA's default choice")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of softmax attention over q (M, H, L, D), k (M, H, S, D), v (M, H, S, Dv), ``causal`` for L = S:
    out in q's dtype, lse (M, H, L) float32 (float64 for float64 inputs), lse_i = log sum_j exp(scale q_i . k_j).

    Without autograd, the fused kernels' own log-sum-exp: on CUDA the flash kernel
    (``aten._scaled_dot_product_flash_attention``; half precision) or the memory-efficient one (float32, float64),
    on the CPU ``aten._scaled_dot_product_flash_attention_for_cpu``; their lse is not differentiable, so with
    autograd (or on another device, or if such a kernel refuses the inputs: a warning) ``common``'s tiled
    :func:`~common.attention.attention_with_lse`, differentiable in out and lse."""
    if not _needs_grad(q, k, v) and q.device.type in ("cuda", "cpu"):
        width = -(-max(q.shape[-1], v.shape[-1]) // 8) * 8  # the kernels want one head size, a multiple of 8
        qp, kp, vp = (t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))
        try:
            if q.device.type == "cpu":
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qp, kp, vp, 0.0, causal,
                                                                                    scale=scale)
            elif q.dtype in (torch.float16, torch.bfloat16):
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qp, kp, vp, 0.0, causal, False,
                                                                              scale=scale)[:2]
            else:
                out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qp, kp, vp, None, True, 0.0, causal,
                                                                                  scale=scale)[:2]
            return out[..., :v.shape[-1]], lse[..., :q.shape[-2]].to(_score_dtype(q.dtype))
        except (RuntimeError, TypeError, NotImplementedError) as err:
            warnings.warn(f"knn: ivf_blocks could not take the log-sum-exp from a fused attention kernel ({err}); "
                          "using common.attention_with_lse (tiled, slower)")
    return attention_with_lse(q, k, v, scale, causal)


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment: int,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact part of the ``'segments'`` layout: query i (position p_i) attends the keys of its own segment up to
    itself, [L floor(p_i / L), p_i], L = ``segment``; (out (B, H, Nq, Dv), lse (B, H, Nq)). The segments holding
    queries are cut from the keys (zero keys pad the last one, after every query) and the queries placed at their
    positions, so that one batched causal call over square L x L tiles does it (:func:`attention_lse`)."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    first, last = (nk - nq) // segment, (nk - 1) // segment
    n_seg, lead = last - first + 1, nk - nq - first * segment
    total = n_seg * segment
    def tiles(x, before, n):  # (B, H, n, C) rows at [before, before + n) of a zero (B H n_seg, 1, L, C)
        return F.pad(x, (0, 0, before, total - before - n)).reshape(b * h * n_seg, 1, segment, x.shape[-1])
    ks, vs = k[:, :, first * segment:], v[:, :, first * segment:]
    out, lse = attention_lse(tiles(q, lead, nq), tiles(ks, 0, ks.shape[2]), tiles(vs, 0, vs.shape[2]), scale, True)
    out = out.reshape(b, h, total, -1)[:, :, lead:lead + nq]
    return out, lse.reshape(b, h, total)[:, :, lead:lead + nq]


def _indexed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, routing: Routing) -> torch.Tensor:
    """Step 5 non-causal by ``common.indexed_attention``'s Triton kernel: each query block's keys are read through
    its index list (no gathered copy), the log weights added in float32; (B, H, Nq, Dv) in q's dtype."""
    b, h, nq, _ = q.shape
    g, dv = b * h, v.shape[-1]
    n_query_blocks, block = routing.query_ids.shape[1:]
    out = triton_indexed_attention(q, k, v, routing.key_ids.clamp_min(0).view(b, h, n_query_blocks, -1),
                                   routing.bias.view(b, h, n_query_blocks, -1),
                                   routing.query_ids.clamp_min(0).view(b, h, n_query_blocks, block), scale=scale)
    return out.reshape(g, n_query_blocks * block, dv).gather(
        1, routing.query_slot.unsqueeze(-1).expand(g, nq, dv)).view(b, h, nq, dv)


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                     routing: Routing) -> torch.Tensor:
    """Step 5: each query block attends its routed keys; (B, H, Nq, Dv) in q's dtype, differentiable in q, k, v.

    The log weights ride in two extra dimensions (q' = [q, c, c, 0..], k' = [k, hi, lo, 0..], c = 1 / scale,
    hi + lo = the log weight), so the call takes no mask and runs the flash kernel: non-causal, and causal in the
    ``'segments'`` layout, where every routed key lies before the query block's segment and the own segment is
    attended exactly apart (:func:`local_attention`), the two merged by their log-sum-exps (float16 inputs are
    routed in float32 there: float16 cannot hold c * ``_DROPPED``). In the ``'mask'`` layout (and non-causal
    float16) the weights join an additive mask in q's dtype (with the position mask under ``causal``) and the
    memory-efficient kernel runs."""
    b, h, nq, d = q.shape
    nk, dv, g = k.shape[2], v.shape[-1], b * h
    n_query_blocks, block = routing.query_ids.shape[1:]
    width = routing.key_ids.shape[-1]
    segmented = causal and routing.segment > 0
    if not causal and not _needs_grad(q, k, v) and triton_supports(q, k, v) is None:
        try:
            return _indexed(q, k, v, scale, routing)
        except Exception as err:  # noqa: BLE001 - an optional kernel (compilation, launch): the SDPA path is the same
            warnings.warn(f"knn: ivf_blocks could not use the Triton indexed-attention kernel ({type(err).__name__}: "
                          f"{err}); using the gathered SDPA path")
    query_rows = _flat_index(routing.query_ids, nq).reshape(g * n_query_blocks, block)
    bias = routing.bias.reshape(g * n_query_blocks, 1, width)
    n_key_blocks, n_chosen = routing.key_blocks.shape[1], routing.chosen.shape[-1]
    n_rest = (width - n_chosen * block) // block  # blocks of sink / own keys / draws per query block
    # keys are gathered in whole blocks (rows of block * D numbers) from one table: every key block, then every
    # query block's rest; row by row only once per call
    table_rows = torch.cat([_flat_index(routing.key_blocks, nk).reshape(-1),
                            _flat_index(routing.key_ids[..., n_chosen * block:], nk).reshape(-1)])
    blocks = torch.cat([routing.chosen + (torch.arange(g, device=q.device) * n_key_blocks).view(g, 1, 1),
                        g * n_key_blocks + torch.arange(g * n_query_blocks * n_rest, device=q.device).view(
                            g, n_query_blocks, n_rest)], -1).reshape(g * n_query_blocks, -1)
    masked = not segmented and (causal or q.dtype == torch.float16)  # float16 cannot hold c * _DROPPED
    if masked:
        qf, kf, vf, dq, dk = _flat_rows(q), _flat_rows(k), _flat_rows(v), d, dv
        # int32 positions: the broadcast comparison that builds the mask reads half as much
        key_pos = routing.key_ids.reshape(g * n_query_blocks, 1, width).int()
        query_pos = routing.query_pos.reshape(g * n_query_blocks, block, 1).int()
    else:  # head dimension padded to a multiple of 8 holding the two weight columns (and v's columns)
        dq = dk = -(-max(d + 2, dv) // 8) * 8
        work = (lambda t: t.float()) if q.dtype == torch.float16 else (lambda t: t)
        qf, kf, vf = _augmented(work(q), dq, 1 / scale), _augmented(work(k), dq), _augmented(work(v), dq)
    key_table = kf.index_select(0, table_rows).view(-1, block * dq)
    value_table = vf.index_select(0, table_rows).view(-1, block * dk)
    chunk = max(1, _CHUNK_ELEMENTS // (width * max(block, dq)))
    outs, lses = [], []
    for s in range(0, g * n_query_blocks, chunk):
        c = slice(s, s + chunk)
        m = query_rows[c].shape[0]
        keys = key_table.index_select(0, blocks[c].reshape(-1)).view(m, 1, width, dq)
        if causal and masked:  # -inf after the query's position (pads have id -1 and bias -inf already)
            mask = torch.where(key_pos[c] <= query_pos[c], bias[c].to(q.dtype), float("-inf")).unsqueeze(1)
        elif masked:  # one bias row per query block, broadcast over its queries
            mask = bias[c].to(q.dtype).expand(m, block, width).unsqueeze(1)
        else:  # written in place into the gathered keys' two zero columns (no second copy of the keys)
            keys[..., d:d + 2] = _split(bias[c].view(m, 1, width), keys.dtype)
            mask = None
        queries = qf.index_select(0, query_rows[c].reshape(-1)).view(m, 1, block, dq)
        values = value_table.index_select(0, blocks[c].reshape(-1)).view(m, 1, width, dk)
        if segmented:
            out, lse = attention_lse(queries, keys, values, scale)
            outs.append(out[..., :dv])
            lses.append(lse)
        else:
            outs.append(_sdpa(queries, keys, values, mask, scale)[..., :dv])
    out = torch.cat(outs).reshape(g, n_query_blocks * block, dv)
    out = out.gather(1, routing.query_slot.unsqueeze(-1).expand(g, nq, dv)).view(b, h, nq, dv)  # query order
    if not segmented:
        return out
    lse = torch.cat(lses).reshape(g, n_query_blocks * block).gather(1, routing.query_slot).view(b, h, nq)
    local_out, local_lse = local_attention(q, k, v, routing.segment, scale)
    ones = lse.new_ones(lse.shape)
    merged = PartialSums(out.to(lse.dtype), ones, lse).merge(PartialSums(local_out.to(lse.dtype), ones, local_lse))
    return merged.output().to(q.dtype)


def ivf_blocks_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                         opts: BlockOptions, generator: torch.Generator | None, index_seed: int = 0) -> torch.Tensor:
    """kNN attention through routed blocks (module docstring): estimator (b), or (a) with ``num_samples=0``. The
    k-means subsample is drawn from a fresh stream seeded with ``index_seed`` (the same cells at every call, none on
    the 'meta' device), the tail from ``generator``."""
    index_generator = None if q.device.type == "meta" else torch.Generator(q.device).manual_seed(index_seed)
    return routed_attention(q, k, v, causal, scale, route(q, k, causal, scale, opts, generator, index_generator))
