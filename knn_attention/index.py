"""Top-k retrieval of keys for each query (the "kNN" of kNN attention; Haris 2024, Sec. 3).

For each (batch, head) an inner-product index is built over that head's keys and searched with the queries:

- ``flat``: exact maximum inner product search (faiss ``IndexFlatIP``; O(Nq Nk d) but a single BLAS call);
- ``ivf``: inverted file (faiss ``IndexIVFFlat``, k-means with ``nlist`` cells, ``nprobe`` cells searched):
  sub-quadratic, approximate;
- ``ivf_blas``: the same inverted-file idea, S_i = every key of the probed cells, scored by dense matmuls fused
  with the estimator (``ivf_blocked.py``; it never materialises per-query index lists, so it does not go here);
- ``hnsw``: hierarchical navigable small-world graph (faiss ``IndexHNSWFlat``, ``hnsw_m`` links,
  ``ef_search``): sub-quadratic, approximate;
- ``torch``: exact top-k of the dense score matrix with ``torch.topk`` (quadratic memory; useful on GPU,
  where faiss-cpu is not, and as the reference of the tests).

Only ``flat`` and ``torch`` return the true top-k; the lazy Gumbel sampler relies on that (its tail bound).

Causal retrieval (:func:`causal_top_k_indices`) never lets a future key influence a query: positions are cut into
blocks of ``block`` tokens, the index is grown block by block (``add``), and the queries of block c search an index
holding only the keys of blocks < c. (The keys of a query's own block are handled exactly by the caller.) IVF is
not offered causally, since its k-means quantizer would be trained on future keys.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from common.attention import causal_query_positions
from common.validation import check_choice, check_int

INDEX_TYPES = ("flat", "ivf", "ivf_blas", "hnsw", "torch")
DEFAULT_NPROBE = {"ivf": 8, "ivf_blas": 8}
EXACT_INDEX_TYPES = ("flat", "torch")


@dataclass
class IndexOptions:
    """Index type and its parameters (defaults: nlist = ceil(sqrt(Nk)) for ``ivf``, 4 ceil(sqrt(Nk)) for
    ``ivf_blas``; nprobe = 8; hnsw_m = 32, ef_search = 64)."""
    kind: str = "flat"
    nlist: int | None = None
    nprobe: int | None = None
    hnsw_m: int = 32
    ef_search: int = 64

    def __post_init__(self):
        check_choice(self.kind, "index", "knn", INDEX_TYPES)
        if self.nlist is not None:
            check_int(self.nlist, "nlist", "knn", minimum=1)
        if self.nprobe is None:
            self.nprobe = DEFAULT_NPROBE.get(self.kind, 8)
        for name in ("nprobe", "hnsw_m", "ef_search"):
            check_int(getattr(self, name), name, "knn", minimum=1)


@dataclass
class SearchTimes:
    build_s: float = 0.0
    search_s: float = 0.0


def _faiss_index(keys: np.ndarray, opts: IndexOptions):
    import faiss

    n, d = keys.shape
    if opts.kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif opts.kind == "ivf":
        nlist = min(opts.nlist or math.ceil(math.sqrt(n)), n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.min_points_per_centroid = 1  # small n: no warning spam
        index.cp.max_points_per_centroid = 32  # k-means trained on a subsample of 32 nlist keys
        index.cp.niter = 10
        index.train(keys)
        index.nprobe = min(opts.nprobe, nlist)
    else:
        index = faiss.IndexHNSWFlat(d, opts.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = opts.ef_search
    index.add(keys)
    return index


def _build_empty_faiss(d: int, opts: IndexOptions):
    import faiss

    if opts.kind == "flat":
        return faiss.IndexFlatIP(d)
    index = faiss.IndexHNSWFlat(d, opts.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = opts.ef_search
    return index


def causal_top_k_indices(q: torch.Tensor, k: torch.Tensor, top_k: int, block: int, opts: IndexOptions,
                         times: SearchTimes | None = None) -> torch.Tensor:
    """Indices (B, H, Nq, top_k) of each query's best keys among the blocks strictly before its own; -1 pads.

    Query i sits at position p_i = i + Nk - Nq, in block c = p_i // block; it searches keys j < c * block.
    """
    if opts.kind == "ivf":
        raise ValueError("knn: index='ivf' is not available with causal=True (its quantizer would be trained on "
                         "future keys); use 'flat', 'hnsw' or 'torch'")
    b, h, nq, d = q.shape
    nk = k.shape[2]
    positions = causal_query_positions(nq, nk)
    out = torch.full((b, h, nq, top_k), -1, dtype=torch.long)
    qd, kd = q.detach(), k.detach()
    qn = qd.to("cpu", torch.float32).numpy() if opts.kind != "torch" else None
    kn = kd.to("cpu", torch.float32).numpy() if opts.kind != "torch" else None
    first_block = int(positions[0]) // block
    for bi in range(b):
        for hi in range(h):
            index = None if opts.kind == "torch" else _build_empty_faiss(d, opts)
            added = 0
            for c in range(first_block, (nk - 1) // block + 1):
                rows = ((positions // block) == c).nonzero().squeeze(-1)
                start_key = c * block
                if rows.numel() == 0 or start_key == 0:
                    continue
                want = min(top_k, start_key)
                t0 = time.perf_counter()
                if opts.kind == "torch":
                    found = torch.topk(qd[bi, hi, rows] @ kd[bi, hi, :start_key].T, want, dim=-1).indices.cpu()
                else:
                    index.add(np.ascontiguousarray(kn[bi, hi, added:start_key]))
                    added = start_key
                    t1 = time.perf_counter()
                    if times is not None:
                        times.build_s += t1 - t0
                    t0 = t1
                    found = torch.from_numpy(index.search(np.ascontiguousarray(qn[bi, hi, rows.numpy()]), want)[1])
                if times is not None:
                    times.search_s += time.perf_counter() - t0
                out[bi, hi, rows, :want] = found
    return out.to(q.device)


def causal_local_keys(n_queries: int, n_keys: int, block: int, device=None) -> torch.Tensor:
    """(Nq, block) ids of the keys of each query's own block up to its position p_i (-1 pads): the part of S_i
    that :func:`causal_top_k_indices` leaves to exact evaluation."""
    positions = causal_query_positions(n_queries, n_keys, device)
    local = (positions // block * block).unsqueeze(1) + torch.arange(block, device=device)
    return local.masked_fill(local > positions.unsqueeze(1), -1)


def top_k_indices(q: torch.Tensor, k: torch.Tensor, top_k: int, opts: IndexOptions,
                  times: SearchTimes | None = None) -> torch.Tensor:
    """Indices (B, H, Nq, top_k) of the keys with the largest q . k per query, best first.

    Approximate indices may return -1 for missing neighbours (fewer than top_k found); callers mask those.
    """
    b, h, nq, d = q.shape
    nk = k.shape[2]
    if top_k > nk:
        raise ValueError(f"knn: k={top_k} is larger than the number of keys Nk={nk}")
    if opts.kind == "torch":
        start = time.perf_counter()
        idx = torch.topk(torch.matmul(q.detach(), k.detach().transpose(-1, -2)), top_k, dim=-1).indices
        if times is not None:
            times.search_s += time.perf_counter() - start
        return idx
    out = np.empty((b, h, nq, top_k), dtype=np.int64)
    qn = q.detach().to("cpu", torch.float32).numpy()
    kn = k.detach().to("cpu", torch.float32).numpy()
    for bi in range(b):
        for hi in range(h):
            start = time.perf_counter()
            index = _faiss_index(np.ascontiguousarray(kn[bi, hi]), opts)
            mid = time.perf_counter()
            _, out[bi, hi] = index.search(np.ascontiguousarray(qn[bi, hi]), top_k)
            if times is not None:
                times.build_s += mid - start
                times.search_s += time.perf_counter() - mid
    return torch.from_numpy(out).to(q.device)
