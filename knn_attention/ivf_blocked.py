"""kNN attention evaluated cell by cell over an inverted file (``index='ivf_blas'``; Haris 2024, Sec. 4, Alg. 2).

The estimators (a) and (b) of ``forward_pass.py`` need, per query i, the scores of its retrieved set S_i and of l
tail keys, and the sums sum_j w_ij v_j. Done query by query this is a gather of (k + l) key and value rows per
query: 2 (k + l) d n floats of scattered memory traffic, which on a CPU costs more than the arithmetic (and a faiss
IVF search with k = sqrt(n) spends most of its time in its k-heaps). An inverted file (IVF) removes the gathers,
because the queries that probe the same cell share its keys:

1. cells: faiss k-means (``faiss.Kmeans``, trained on a subsample of 32 points per centroid, 10 iterations) puts
   ``nlist`` centroids c_1..c_nlist among the keys (default nlist = 4 ceil(sqrt(n)), cells of about sqrt(n) / 4
   keys); every key joins its nearest centroid's cell; keys and values are stored sorted by cell;
2. probe: query i visits the ``nprobe`` non-empty cells whose centroid has the largest cosine with q_i. (Ranking by
   q_i . c, the mean score of the cell, favours long centroids: a cell that straddles two clusters has a short
   centroid and loses to long far-away ones; measured at n = 2^16 on ``clustered_concentrated`` input: 16% error
   with q . c, 4.9% with the cosine, on 4,096 of the queries.) Its retrieved set S_i is every key of those cells:
   |S_i| is about nprobe n / nlist (2 sqrt(n) with the default nprobe = 8), the k of the paper, set through
   nprobe and nlist;
3. sums: one sweep over the cells; for cell c one dense matmul scores all queries that probe it against all its
   keys and adds exp(s_ij - m_i) v_j to their numerators (and exp(s_ij - m_i) to their denominators), m_i a running
   maximum, the sums being rescaled by exp(m_old - m_new) when it grows (the online softmax).

Tail (estimator (b)): the queries are cut into blocks of ``tail_block`` consecutive queries and each block shares l
key ids drawn uniformly with replacement from all n keys; query i keeps the draws not in S_i (their cell is not
probed) with weight n / l:

    E[ (n / l) sum_s [j_s not in S_i] e^{s_i j_s} v_{j_s} ] = sum_{j not in S_i} e^{s_ij} v_j,

the same unbiased tail sum as the per-query (n - k) / l estimator (a fraction |S_i| / n of the draws is wasted;
sharing draws across queries correlates their errors but leaves each query's estimate unbiased). The tail is then
one batched matmul per block instead of l gathered rows per query.

Cost per (batch, head): k-means O(32 nlist^2 d), probing O(n nlist d), cells O(n nprobe (n / nlist) d) by BLAS,
tail O(n l d) by BLAS: O(n^1.5 d) with nlist, l ~ sqrt(n) and nprobe fixed. S_i is not the exact top set (keys of
unprobed cells are never retrieved), so this index, like faiss ``ivf``, serves (a) and (b) but not lazy Gumbel
sampling. Autograd differentiates through the scores with the cells, probes and tail draws held fixed.
Non-causal only: the k-means cells are built from all keys.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from common.partial_sums import PartialSums, from_logits


@dataclass
class Cells:
    """An inverted file over the keys of one (batch, head): ``order`` sorts the keys by cell, cell c holding the
    sorted positions ``starts[c]:starts[c + 1]``; ``position`` (n,) inverts ``order`` (key id -> sorted position)."""
    centroids: torch.Tensor
    order: torch.Tensor
    starts: list[int]
    cell_of_key: torch.Tensor


def build_cells(keys: torch.Tensor, nlist: int, seed: int = 0) -> Cells:
    """k-means cells over ``keys`` (n, d) (step 1 of the module docstring)."""
    import faiss

    n, d = keys.shape
    nlist = min(nlist, n)
    data = np.ascontiguousarray(keys.detach().to("cpu", torch.float32).numpy())
    kmeans = faiss.Kmeans(d, nlist, niter=10, seed=seed, min_points_per_centroid=1, max_points_per_centroid=32)
    kmeans.train(data)
    centroids = torch.from_numpy(kmeans.centroids).to(keys.device, keys.dtype)
    kd = keys.detach()
    # nearest centroid in L2: argmax_c k . c - |c|^2 / 2
    cell = (kd @ centroids.T - 0.5 * (centroids * centroids).sum(-1)).argmax(-1)
    order = torch.argsort(cell, stable=True)
    counts = torch.bincount(cell, minlength=nlist)
    starts = [0] + torch.cumsum(counts, 0).tolist()
    return Cells(centroids=centroids, order=order, starts=starts, cell_of_key=cell)


def _probes(q: torch.Tensor, cells: Cells, nprobe: int) -> torch.Tensor:
    """(Nq, nprobe') ids of the non-empty cells whose centroid c has the largest cosine with q (step 2)."""
    sizes = torch.tensor(np.diff(cells.starts), device=q.device)
    directions = cells.centroids / cells.centroids.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    score = (q.detach() @ directions.T).masked_fill(sizes == 0, float("-inf"))
    return score.topk(min(nprobe, int((sizes > 0).sum())), dim=-1).indices


def _cell_pairs(probes: torch.Tensor, nlist: int):
    """For each cell, the ids of the queries that probe it (queries of one cell are distinct)."""
    nq, nprobe = probes.shape
    flat = probes.reshape(-1)
    order = torch.argsort(flat, stable=True)
    queries = (order // nprobe)
    bounds = [0] + torch.cumsum(torch.bincount(flat, minlength=nlist), 0).tolist()
    return [(c, queries[bounds[c]:bounds[c + 1]]) for c in range(nlist) if bounds[c + 1] > bounds[c]]


def ivf_blocked_attention(q, k, v, scale: float, num_samples: int, with_tail: bool, nlist: int, nprobe: int,
                          tail_block: int, generator: torch.Generator, seed: int = 0, times=None) -> torch.Tensor:
    """Estimator (a) (``with_tail=False``) or (b) of one (batch, head): q (Nq, d), k (Nk, d), v (Nk, dv).

    ``times`` (``index.SearchTimes``), when given, gets the seconds of step 1 (build) and step 2 (search).
    """
    nq, nk = q.shape[0], k.shape[0]
    start = time.perf_counter()
    cells = build_cells(k, nlist, seed)
    mid = time.perf_counter()
    probes = _probes(q, cells, nprobe)
    pairs = _cell_pairs(probes, len(cells.starts) - 1)
    if times is not None:
        times.build_s += mid - start
        times.search_s += time.perf_counter() - mid
    ks, vs = k[cells.order], v[cells.order]
    # step 3: sweep the cells, merging each cell's sums into the running ones (the online softmax)
    sums = PartialSums.empty((nq,), v.shape[1], q)
    for c, rows in pairs:
        cell = slice(cells.starts[c], cells.starts[c + 1])
        merged = sums.map_queries(lambda t, rows=rows: t[rows]).merge(
            from_logits((q[rows] @ ks[cell].T) * scale, vs[cell], "qk,kv->qv"))
        sums.num[rows], sums.den[rows], sums.shift[rows] = merged.num, merged.den, merged.shift
    if with_tail:
        blocks = math.ceil(nq / tail_block)
        draws = torch.randint(nk, (blocks, num_samples), generator=generator, device=q.device)
        pad = blocks * tail_block - nq
        qb = torch.nn.functional.pad(q, (0, 0, 0, pad)).view(blocks, tail_block, -1)
        tail_s = (qb @ k[draws].transpose(1, 2)).reshape(-1, num_samples)[:nq] * scale  # (Nq, l)
        probed = torch.zeros(nq, len(cells.starts) - 1, dtype=torch.bool, device=q.device).scatter_(1, probes, True)
        draw_cell = cells.cell_of_key[draws].repeat_interleave(tail_block, 0)[:nq]  # (Nq, l)
        tail_s = tail_s.masked_fill(probed.gather(1, draw_cell), float("-inf"))  # draws inside S_i drop out
        # log(n / l) added to the scores is the n / l weight of each draw
        logits = torch.nn.functional.pad(tail_s + math.log(nk / num_samples), (0, 0, 0, pad), value=float("-inf"))
        tail = from_logits(logits.view(blocks, tail_block, num_samples), v[draws], "btl,blv->btv")
        sums = sums.merge(tail.map_queries(lambda t: t.reshape(-1, t.shape[-1])[:nq]))
    return sums.output()
