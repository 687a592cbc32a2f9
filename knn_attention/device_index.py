"""Top-k retrieval of keys on the tensors' own device, in torch only (the "kNN" of kNN attention; Haris 2024, Sec. 3).

``index.py`` retrieves with faiss on the host; these two functions never leave the device of q and k (no copy to
the host, no synchronisation: every shape is known from the input shapes), so knn runs on CUDA tensors unchanged:

- :func:`blocked_top_k`: the exact top-k keys of every query by q . k, computed over blocks of ``key_block`` keys
  with a running top-k merge (after each block, top-k of the k best so far and the block's scores), so memory is
  O(B H Nq (key_block + k)) instead of the O(B H Nq Nk) of ``torch.topk`` on the full score matrix.
- :func:`ivf_top_k`: an approximate inverted file like ``ivf_blas`` (``ivf_blocked.py``), built and searched on
  the device (see its docstring): Lloyd's k-means, keys sorted by cell into fixed-size chunks, each query scores
  the keys of its ``nprobe`` best chunks by dense batched matmuls, then keeps its top k.

Both return :class:`TopK` (scores, indices), best first, each (B, H, Nq, k):

- ``scores``: q . k (no softmax scale, so the ranking is that of the scaled scores for any scale > 0), float32.
  Half inputs (bf16, fp16) are upcast to float32 before the products, so scores are accumulated and rounded in
  float32; fp64 inputs are scored in float64 and returned as float32. Not differentiable (retrieval is discrete;
  the caller rescores the retrieved keys, as ``softmax_expectation.retrieved_set`` does).
- ``indices``: long key ids in [0, Nk), or -1 where a query has fewer than k allowed (or, for the IVF, probed)
  keys; such slots have score -inf. Real keys always come before the padding.

Causal rule. With ``causal=True`` query i sits at position p_i = i + Nk - Nq (``common.causal_query_positions``,
bottom-right alignment) and may only retrieve keys j < limit_i:

- ``causal_block=None``: limit_i = p_i + 1, token-causal (key j <= p_i);
- ``causal_block=b``: limit_i = b floor(p_i / b), block-causal: only keys of the blocks strictly before the
  query's own block, the rule of ``index.causal_top_k_indices`` that ``forward_pass`` uses (its caller adds the
  keys of the query's own block exactly, ``index.causal_local_keys``). With this option ``blocked_top_k`` returns
  exactly what ``causal_top_k_indices`` returns (ties aside), without the per-block Python loop over (B, H).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from common.attention import causal_query_positions
from common.validation import check_int

# Work chunks are sized so that their largest intermediate holds about this many numbers.
_CHUNK_ELEMENTS = 2 ** 26


class TopK(NamedTuple):
    """Best-first top-k of every query: ``scores`` (B, H, Nq, k) float32 q . k (-inf pads) and ``indices``
    (B, H, Nq, k) long key ids (-1 pads)."""
    scores: torch.Tensor
    indices: torch.Tensor


def _check(q: torch.Tensor, k: torch.Tensor, top_k: int, causal_block):
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"knn: q (B, H, Nq, D) and k (B, H, Nk, D) must agree in B, H and D, got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if q.device != k.device:
        raise ValueError(f"knn: q and k must be on one device, got {q.device} and {k.device}")
    check_int(top_k, "k", "knn", minimum=1)
    if causal_block is not None:
        check_int(causal_block, "causal_block", "knn", minimum=1)


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype (bf16, fp16, fp32) is scored in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _limits(n_queries: int, n_keys: int, causal: bool, causal_block: int | None, device) -> torch.Tensor:
    """(Nq,) limit_i: query i may retrieve the keys j < limit_i (module docstring, causal rule)."""
    if not causal:
        return torch.full((n_queries,), n_keys, dtype=torch.long, device=device)
    positions = causal_query_positions(n_queries, n_keys, device)
    return positions + 1 if causal_block is None else positions // causal_block * causal_block


def _first_row_reading(key: int, n_queries: int, n_keys: int, causal: bool, causal_block: int | None) -> int:
    """The first query i whose limit_i > key (limits grow with i); Nq if none. Plain integers: no device work."""
    if not causal:
        return 0
    offset = n_keys - n_queries
    if causal_block is None:  # p_i + 1 > key  <=>  i >= key - offset
        first = key - offset
    else:  # b floor(p_i / b) > key  <=>  p_i >= b (floor(key / b) + 1)
        first = (key // causal_block + 1) * causal_block - offset
    return min(max(first, 0), n_queries)


def _pad_to_k(scores: torch.Tensor, indices: torch.Tensor, top_k: int) -> TopK:
    """Float32 scores, -1 on every -inf slot, and -inf / -1 columns appended up to k."""
    indices = indices.masked_fill(scores == float("-inf"), -1)
    missing = top_k - scores.shape[-1]
    if missing > 0:
        scores = torch.nn.functional.pad(scores, (0, missing), value=float("-inf"))
        indices = torch.nn.functional.pad(indices, (0, missing), value=-1)
    return TopK(scores.float(), indices)


@torch.no_grad()
def blocked_top_k(q: torch.Tensor, k: torch.Tensor, top_k: int, *, causal: bool = False,
                  causal_block: int | None = None, key_block: int | None = None) -> TopK:
    """Exact top-k keys of every query by q . k: q (B, H, Nq, D), k (B, H, Nk, D) -> :class:`TopK` (B, H, Nq, k).

    Keys are scored ``key_block`` at a time and merged into the running top-k (memory O(B H Nq (key_block + k)));
    default: blocks of about 2^26 / (B H Nq) keys (a 256 MB float32 block of scores), at least max(256, 4 k).
    Under ``causal`` only keys j < limit_i are returned (module docstring); key blocks that no query may read are
    skipped, and a block is scored only for the queries that may read some of it. A query with fewer than k
    allowed keys (early causal rows, or k > Nk) gets -inf / -1 in its last slots.
    """
    _check(q, k, top_k, causal_block)
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    width = min(top_k, nk)
    key_block = (max(256, 4 * width, _CHUNK_ELEMENTS // max(1, b * h * nq)) if key_block is None
                 else check_int(key_block, "key_block", "knn", minimum=1))
    dtype = _score_dtype(q.dtype)
    scores = q.new_full((b, h, nq, width), float("-inf"), dtype=dtype)
    indices = torch.full((b, h, nq, width), -1, dtype=torch.long, device=q.device)
    limits = _limits(nq, nk, causal, causal_block, q.device)
    # keys no query may read (the last query's limit is Nk, or the start of its block) are never scored
    last = nk if not causal or causal_block is None else (nk - 1) // causal_block * causal_block
    qs = q.detach().to(dtype)
    for start in range(0, last, key_block):
        stop = min(start + key_block, last)
        row = _first_row_reading(start, nq, nk, causal, causal_block)
        if row == nq:
            continue
        block = qs[:, :, row:] @ k[:, :, start:stop].detach().to(dtype).transpose(-1, -2)
        if causal:
            ids = torch.arange(start, stop, device=q.device)
            block = block.masked_fill(ids >= limits[row:].unsqueeze(-1), float("-inf"))
        # the block's own top-k (when the block is wider than k), then the merge with the running top-k
        if stop - start > width:
            found = block.topk(width, dim=-1)
            block, block_ids = found.values, found.indices + start
        else:
            block_ids = torch.arange(start, stop, device=q.device).expand(b, h, nq - row, stop - start)
        merged = torch.cat([scores[:, :, row:], block], dim=-1)
        merged_ids = torch.cat([indices[:, :, row:], block_ids], dim=-1)
        best = merged.topk(width, dim=-1)
        scores[:, :, row:] = best.values
        indices[:, :, row:] = merged_ids.gather(-1, best.indices)
    return _pad_to_k(scores, indices, top_k)


@dataclass
class DeviceCells:
    """An inverted file over the keys of every (batch, head) g = b H + h, stored in fixed-size chunks.

    ``chunk_keys`` (G, C, cell_size): key ids (-1 pads) of each chunk; every chunk holds keys of one k-means cell
    only, in increasing position; ``chunk_vectors`` (G, C, cell_size, D) those keys (zeros for pads), in the score
    dtype; ``directions`` (G, C, D) the unit mean of each chunk (zero for an empty chunk); ``first_key`` (G, C)
    the smallest key id of each chunk (Nk if empty); ``cell_of_key`` (G, Nk) the k-means cell of each key.
    """
    chunk_keys: torch.Tensor
    chunk_vectors: torch.Tensor
    directions: torch.Tensor
    first_key: torch.Tensor
    cell_of_key: torch.Tensor


def _nearest_centroid(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(G, n) id of the nearest centroid (L2: argmax_c x . c - |c|^2 / 2) of each row of x (G, n, D), in chunks."""
    half_norm = -0.5 * (centroids * centroids).sum(-1).unsqueeze(1)
    rows = max(1, _CHUNK_ELEMENTS // max(1, x.shape[0] * centroids.shape[1]))
    return torch.cat([torch.baddbmm(half_norm, x[:, s:s + rows], centroids.transpose(1, 2)).argmax(-1)
                      for s in range(0, x.shape[1], rows)], dim=1)


def _count(ids: torch.Tensor, n_bins: int) -> torch.Tensor:
    """(G, n_bins) occurrences of each id in every row of ids (G, n) (a batched bincount)."""
    return torch.zeros(ids.shape[0], n_bins, dtype=torch.long, device=ids.device).scatter_add_(
        1, ids, torch.ones_like(ids))


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return x.cumsum(-1) - x


def _group_into_chunks(group: torch.Tensor, n_groups: int, chunk: int):
    """Lay out items (G, n) with group ids in [0, n_groups) so that each group fills whole chunks of ``chunk``
    slots: returns (slots (G, S) item ids with -1 pads, S = chunk ceil((n + n_groups (chunk - 1)) / chunk), a
    static bound; chunk_group (G, S / chunk) the group of each chunk, n_groups - 1 for the unused ones; dest
    (G, n) the slot of each item). Items keep their order within a group (stable sort)."""
    g, n = group.shape
    order = torch.argsort(group, dim=-1, stable=True)
    sorted_group = group.gather(1, order)
    counts = _count(group, n_groups)
    padded = (counts + chunk - 1) // chunk * chunk
    rank = torch.arange(n, device=group.device) - _exclusive_cumsum(counts).gather(1, sorted_group)
    dest_sorted = _exclusive_cumsum(padded).gather(1, sorted_group) + rank
    dest = torch.empty_like(dest_sorted).scatter_(1, order, dest_sorted)
    n_chunks = math.ceil((n + n_groups * (chunk - 1)) / chunk)
    slots = torch.full((g, n_chunks * chunk), -1, dtype=torch.long, device=group.device).scatter_(1, dest_sorted, order)
    chunk_start = torch.arange(n_chunks, device=group.device) * chunk
    chunk_group = torch.searchsorted(padded.cumsum(-1), chunk_start.expand(g, n_chunks).contiguous(), right=True)
    return slots, chunk_group.clamp_max(n_groups - 1), dest


def _rows(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows of x (G, n, D) at ids (G, *S) (-1 -> a zero row): (G, *S, D), one index_select on the flat rows."""
    g, n, d = x.shape
    flat = torch.cat([x.reshape(g * n, d), x.new_zeros(1, d)])
    base = (torch.arange(g, device=x.device) * n).view(g, *([1] * (ids.dim() - 1)))
    index = torch.where(ids >= 0, ids + base, g * n)
    return flat.index_select(0, index.reshape(-1)).view(*ids.shape, d)


def kmeans(keys: torch.Tensor, nlist: int, iterations: int = 10, points_per_centroid: int = 32,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """min(nlist, Nk) k-means centroids (G, nlist, D) of keys (G, Nk, D) on their device: Lloyd's algorithm, batched
    over G, on the keys at min(Nk, points_per_centroid nlist) random positions (the same positions for every g),
    started from nlist of them; an empty cell keeps its centroid. No host synchronisation."""
    g, nk, d = keys.shape
    nlist = min(nlist, nk)
    sample = keys[:, torch.randperm(nk, generator=generator, device=keys.device)[:min(nk, points_per_centroid * nlist)]]
    centroids = sample[:, :nlist]
    base = (torch.arange(g, device=keys.device) * nlist).unsqueeze(1)
    for _ in range(iterations):
        # cell sums by index_add_ (sync-free; torch's bincount reads its maximum back to the host on CUDA, _count
        # does not)
        flat = (_nearest_centroid(sample, centroids) + base).reshape(-1)
        counts = _count(flat.unsqueeze(0), g * nlist).view(g, nlist, 1)
        sums = sample.new_zeros(g * nlist, d).index_add_(0, flat, sample.reshape(-1, d))
        centroids = torch.where(counts > 0, sums.view(g, nlist, d) / counts.clamp_min(1), centroids)
    return centroids


def unit(x: torch.Tensor) -> torch.Tensor:
    """x / |x| along the last dimension (a zero row stays zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def build_device_cells(keys: torch.Tensor, nlist: int, cell_size: int, iterations: int = 10,
                       points_per_centroid: int = 32, generator: torch.Generator | None = None) -> DeviceCells:
    """k-means cells over keys (G, Nk, D) on their device (:func:`kmeans`), cut into chunks of ``cell_size`` keys
    (step 1 of :func:`ivf_top_k`): every key joins its nearest centroid's cell."""
    g, nk, d = keys.shape
    nlist = min(nlist, nk)
    cell = _nearest_centroid(keys, kmeans(keys, nlist, iterations, points_per_centroid, generator))
    slots, _, _ = _group_into_chunks(cell, nlist, cell_size)
    chunk_keys = slots.view(g, -1, cell_size)
    vectors = _rows(keys, chunk_keys)
    valid = chunk_keys >= 0
    mean = vectors.sum(2) / valid.sum(-1, keepdim=True).clamp_min(1)
    directions = unit(mean)
    first = torch.where(valid, chunk_keys, nk).amin(-1)
    return DeviceCells(chunk_keys=chunk_keys, chunk_vectors=vectors, directions=directions, first_key=first,
                       cell_of_key=cell)


def _search_cells(q: torch.Tensor, cells: DeviceCells, limits: torch.Tensor, top_k: int, nprobe: int) -> TopK:
    """Steps 2-3 of :func:`ivf_top_k` for queries q (G, n, D) (score dtype) with limits (n,)."""
    g, n, d = q.shape
    chunks, size = cells.chunk_keys.shape[1:]
    # step 2: the nprobe chunks whose unit mean has the largest cosine with q (empty / future chunks: -inf)
    closed = (cells.first_key.unsqueeze(1) >= limits.view(1, -1, 1))
    probes = (q @ cells.directions.transpose(1, 2)).masked_fill(closed, float("-inf")).topk(nprobe, dim=-1).indices
    # step 3: sort the (query, probe) pairs by chunk, in tiles of `tile` pairs that share one chunk's keys
    pairs = n * nprobe
    tile = max(1, min(128, math.ceil(pairs / chunks)))
    slots, tile_chunk, dest = _group_into_chunks(probes.reshape(g, pairs), chunks, tile)
    tiles = tile_chunk.shape[1]
    pair_query = torch.where(slots >= 0, slots // nprobe, -1).view(g, tiles, tile)
    tile_keys = cells.chunk_keys.gather(1, tile_chunk.unsqueeze(-1).expand(g, tiles, size))
    tile_vectors = cells.chunk_vectors.gather(1, tile_chunk.view(g, tiles, 1, 1).expand(g, tiles, size, d))
    scores = _rows(q, pair_query) @ tile_vectors.transpose(-1, -2)  # (G, tiles, tile, size)
    query_limit = torch.cat([limits, limits.new_zeros(1)])[pair_query]  # pads: limit 0
    scores = scores.masked_fill((tile_keys.unsqueeze(2) < 0) | (tile_keys.unsqueeze(2) >= query_limit.unsqueeze(-1)),
                                float("-inf"))
    # back to (query, probe) order: pair p's scores sit in slot dest[p]
    candidates = scores.view(g, tiles * tile, size).gather(1, dest.unsqueeze(-1).expand(g, pairs, size))
    candidates = candidates.view(g, n, nprobe * size)
    best = candidates.topk(min(top_k, nprobe * size), dim=-1)
    chunk = probes.gather(-1, best.indices // size)
    ids = cells.chunk_keys.view(g, 1, -1).expand(g, n, chunks * size).gather(-1, chunk * size + best.indices % size)
    return TopK(best.values, ids)


@torch.no_grad()
def ivf_top_k(q: torch.Tensor, k: torch.Tensor, top_k: int, *, nlist: int | None = None, nprobe: int = 8,
              cell_size: int | None = None, causal: bool = False, causal_block: int | None = None,
              iterations: int = 10, points_per_centroid: int = 32, seed: int = 0,
              generator: torch.Generator | None = None) -> TopK:
    """Approximate top-k keys of every query by q . k through an inverted file built and searched on q's device.

    q (B, H, Nq, D), k (B, H, Nk, D) -> :class:`TopK` (B, H, Nq, k). The index of ``ivf_blas`` (``ivf_blocked.py``)
    with static shapes, batched over the B H heads:

    1. build (:func:`build_device_cells`): ``iterations`` Lloyd steps of k-means with ``nlist`` centroids
       (default 4 ceil(sqrt(Nk)), as ``ivf_blas``) on a subsample of ``points_per_centroid`` keys per centroid;
       keys sorted by (cell, position) and each cell cut into chunks of ``cell_size`` keys (default
       ceil(Nk / nlist), the mean cell size; a chunk never mixes cells; at most ceil(Nk / cell_size) + nlist
       chunks). A chunk is the unit that is probed, so every probe costs the same and no cell size is ever read
       back to the host.
    2. probe: each query takes the ``nprobe`` chunks whose unit mean key has the largest cosine with q (cosine,
       not q . mean: see ``ivf_blocked.py``, step 2); under ``causal`` a chunk whose keys are all beyond limit_i
       is never probed.
    3. score: the (query, probe) pairs are sorted by chunk and cut into tiles of pairs that share one chunk; one
       batched matmul scores every tile's queries against its chunk's keys; keys j >= limit_i score -inf; each
       query keeps the top k of its nprobe * cell_size candidates.

    With nprobe >= the number of chunks (every chunk probed) the result is the exact top-k. ``generator`` (on q's
    device) draws the k-means subsample; default: a fresh one seeded with ``seed`` (none on the 'meta' device,
    which holds no data). Cost per head: k-means O(iterations points_per_centroid nlist^2 D), assignment
    O(Nk nlist D), probing O(Nq (Nk / cell_size + nlist) D), scoring O(Nq nprobe cell_size D), all dense; memory
    is bounded by scoring the queries in chunks.

    Causal: a key j >= limit_i is never returned, but the cells are built from all keys, so which past keys a
    query retrieves depends on future keys (as faiss ``ivf`` would; ``forward_pass`` refuses ``ivf`` causally for
    that reason).
    """
    _check(q, k, top_k, causal_block)
    nk = k.shape[2]
    nlist = min(nk, 4 * math.ceil(math.sqrt(nk)) if nlist is None else check_int(nlist, "nlist", "knn", minimum=1))
    cell_size = (math.ceil(nk / nlist) if cell_size is None
                 else check_int(cell_size, "cell_size", "knn", minimum=1))
    for name, value in (("nprobe", nprobe), ("iterations", iterations), ("points_per_centroid", points_per_centroid)):
        check_int(value, name, "knn", minimum=1 if name != "iterations" else 0)
    b, h, nq, d = q.shape
    dtype = _score_dtype(q.dtype)
    if b * h * nq == 0:  # nothing to search (Nk >= 1 here, or nlist would have failed its check)
        return _pad_to_k(q.new_empty((b, h, nq, 0), dtype=torch.float32),
                         torch.empty((b, h, nq, 0), dtype=torch.long, device=q.device), top_k)
    if generator is None and q.device.type != "meta":
        generator = torch.Generator(device=q.device).manual_seed(seed)
    keys = k.detach().to(dtype).reshape(b * h, nk, d)
    cells = build_device_cells(keys, nlist, cell_size, iterations, points_per_centroid, generator)
    chunks = cells.chunk_keys.shape[1]
    nprobe = min(nprobe, chunks)
    limits = _limits(nq, nk, causal, causal_block, q.device)
    queries = q.detach().to(dtype).reshape(b * h, nq, d)
    rows = max(1, _CHUNK_ELEMENTS // (b * h * max(chunks, nprobe * (cell_size + d))))
    found = [_search_cells(queries[:, s:s + rows], cells, limits[s:s + rows], top_k, nprobe)
             for s in range(0, nq, rows)]
    scores = torch.cat([f.scores for f in found], dim=1).view(b, h, nq, -1)
    indices = torch.cat([f.indices for f in found], dim=1).view(b, h, nq, -1)
    return _pad_to_k(scores, indices, top_k)
