"""Top-k retrieval of keys for each query (the "kNN" of kNN attention; Haris 2024, Sec. 3).

For each (batch, head) an inner-product index is built over that head's keys and searched with the queries:

- ``flat``: exact maximum inner product search (faiss ``IndexFlatIP``; O(Nq Nk d) but a single BLAS call);
- ``ivf``: inverted file (faiss ``IndexIVFFlat``, k-means with ``nlist`` cells, ``nprobe`` cells searched):
  sub-quadratic, approximate;
- ``ivf_blas``: the same inverted-file idea, S_i = every key of the probed cells, scored by dense matmuls fused
  with the estimator (``ivf_blocked.py``; it never materialises per-query index lists, so it does not go here);
- ``hnsw``: hierarchical navigable small-world graph (faiss ``IndexHNSWFlat``, ``hnsw_m`` links,
  ``ef_search``): sub-quadratic, approximate;
- ``torch``: exact top-k in torch on the tensors' own device (``device_index.blocked_top_k``: keys scored block
  by block with a running top-k merge, so the full Nq x Nk score matrix is never held); the reference of the tests
  and the exact path on a GPU, where faiss-cpu is not;
- ``ivf_torch``: an inverted file built and searched in torch on the tensors' own device
  (``device_index.ivf_top_k``: k-means with ``nlist`` cells cut into chunks of ``cell_size`` keys, ``nprobe``
  chunks scored per query): sub-quadratic, approximate. Non-causal only (as ``ivf``).
- ``ivf_blocks``: the fast approximate path on a GPU, causal or not (``block_routing.py``): queries and keys sorted
  by k-means cell and cut into blocks, each query block attends the keys of its ``nprobe`` best key blocks plus a
  shared uniform tail in one fused attention call; like ``ivf_blas`` it has no per-query lists, so it does not go
  here either.

Only ``flat`` and ``torch`` return the true top-k; the lazy Gumbel sampler relies on that (its tail bound).

Device. ``torch`` and ``ivf_torch`` never leave q's device (no copy to the host, no synchronisation). faiss is
CPU-only: with tensors not on the CPU, ``flat`` is served by ``blocked_top_k`` (also exact, same result up to
ties), and ``ivf`` / ``hnsw`` raise a ValueError naming ``ivf_torch`` (a silent host round-trip is what this
option exists to avoid; move the tensors to the CPU to use faiss).

Causal retrieval (:func:`causal_top_k_indices`) never lets a future key influence a query: positions are cut into
blocks of ``block`` tokens, the index is grown block by block (``add``), and the queries of block c search an index
holding only the keys of blocks < c. (The keys of a query's own block are handled exactly by the caller.) IVF
(``ivf``, ``ivf_torch``, and ``ivf_blas`` in ``forward_pass``) is not offered causally: its k-means cells are
built from all keys, so which past keys a query retrieves would depend on future keys. ``torch`` (and ``flat`` off
the CPU) grows no index: ``blocked_top_k(causal=True, causal_block=block)`` applies the same block rule in one
batched pass.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from common.attention import causal_query_positions
from common.validation import check_choice, check_int

from .device_index import blocked_top_k, ivf_top_k

INDEX_TYPES = ("flat", "ivf", "ivf_blas", "hnsw", "torch", "ivf_torch", "ivf_blocks")
DEFAULT_NPROBE = {"ivf": 8, "ivf_blas": 8, "ivf_torch": 8}
EXACT_INDEX_TYPES = ("flat", "torch")
# index kinds that copy the tensors to the host (faiss-cpu)
FAISS_INDEX_TYPES = ("flat", "ivf", "hnsw")
# index kinds that refuse causal=True (k-means cells built from every key, future ones included)
NON_CAUSAL_INDEX_TYPES = ("ivf", "ivf_blas", "ivf_torch")


@dataclass
class IndexOptions:
    """Index type and its parameters (defaults: nlist = ceil(sqrt(Nk)) for ``ivf``, 4 ceil(sqrt(Nk)) for
    ``ivf_blas`` and ``ivf_torch``; nprobe = 8; cell_size (``ivf_torch`` only) = ceil(Nk / nlist); hnsw_m = 32,
    ef_search = 64)."""
    kind: str = "flat"
    nlist: int | None = None
    nprobe: int | None = None
    hnsw_m: int = 32
    ef_search: int = 64
    cell_size: int | None = None

    def __post_init__(self):
        check_choice(self.kind, "index", "knn", INDEX_TYPES)
        if self.nlist is not None:
            check_int(self.nlist, "nlist", "knn", minimum=1)
        if self.cell_size is not None:
            check_int(self.cell_size, "cell_size", "knn", minimum=1)
        if self.nprobe is None and self.kind != "ivf_blocks":  # ivf_blocks: a default that depends on Nk
            self.nprobe = DEFAULT_NPROBE.get(self.kind, 8)
        for name in ("nprobe", "hnsw_m", "ef_search"):
            if getattr(self, name) is not None:
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


def _on_host(q: torch.Tensor) -> bool:
    return q.device.type == "cpu"


def _device_kind(q: torch.Tensor, opts: IndexOptions) -> str:
    """The index kind that serves tensors on q's device: 'flat' off the CPU becomes 'torch' (both exact); 'ivf' /
    'hnsw' off the CPU raise (faiss is CPU-only; module docstring)."""
    if _on_host(q) or opts.kind not in FAISS_INDEX_TYPES:
        return opts.kind
    if opts.kind == "flat":
        return "torch"
    raise ValueError(f"knn: index={opts.kind!r} is faiss, CPU-only, and q is on {q.device}; use index='ivf_torch' "
                     "(approximate) or 'torch' (exact) on this device, or move the tensors to the CPU")


def _ivf_torch(q, k, top_k, opts: IndexOptions, generator, seed: int) -> torch.Tensor:
    return ivf_top_k(q, k, top_k, nlist=opts.nlist, nprobe=opts.nprobe, cell_size=opts.cell_size,
                     generator=generator, seed=seed).indices


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
    Returned on q's device; ``torch`` (and ``flat`` off the CPU) never leaves it.
    """
    if opts.kind in NON_CAUSAL_INDEX_TYPES:
        raise ValueError(f"knn: index={opts.kind!r} is not available with causal=True (its k-means cells would be "
                         "built from future keys); use 'flat', 'hnsw' or 'torch'")
    if _device_kind(q, opts) == "torch":
        start = time.perf_counter()
        idx = blocked_top_k(q, k, top_k, causal=True, causal_block=block).indices
        if times is not None:
            times.search_s += time.perf_counter() - start
        return idx
    b, h, nq, d = q.shape
    nk = k.shape[2]
    positions = causal_query_positions(nq, nk)
    out = torch.full((b, h, nq, top_k), -1, dtype=torch.long)
    qd, kd = q.detach(), k.detach()
    qn = qd.to("cpu", torch.float32).numpy()
    kn = kd.to("cpu", torch.float32).numpy()
    first_block = int(positions[0]) // block
    for bi in range(b):
        for hi in range(h):
            index = _build_empty_faiss(d, opts)
            added = 0
            for c in range(first_block, (nk - 1) // block + 1):
                rows = ((positions // block) == c).nonzero().squeeze(-1)
                start_key = c * block
                if rows.numel() == 0 or start_key == 0:
                    continue
                want = min(top_k, start_key)
                t0 = time.perf_counter()
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
                  times: SearchTimes | None = None, generator: torch.Generator | None = None,
                  seed: int = 0) -> torch.Tensor:
    """Indices (B, H, Nq, top_k) of the keys with the largest q . k per query, best first, on q's device.

    Approximate indices may return -1 for missing neighbours (fewer than top_k found); callers mask those.
    ``generator`` (on q's device) draws the k-means subsample of ``ivf_torch``; default a fresh one seeded with
    ``seed``.
    """
    b, h, nq, d = q.shape
    nk = k.shape[2]
    if top_k > nk:
        raise ValueError(f"knn: k={top_k} is larger than the number of keys Nk={nk}")
    kind = _device_kind(q, opts)
    if kind in ("torch", "ivf_torch"):
        start = time.perf_counter()
        idx = (blocked_top_k(q, k, top_k).indices if kind == "torch"
               else _ivf_torch(q, k, top_k, opts, generator, seed))
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
