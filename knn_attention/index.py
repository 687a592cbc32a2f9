"""Top-k retrieval of keys for each query (the "kNN" of kNN attention; Haris 2024, Sec. 3).

For each (batch, head) an inner-product index is built over that head's keys and searched with the queries:

- ``flat``: exact maximum inner product search (faiss ``IndexFlatIP``; O(Nq Nk d) but a single BLAS call);
- ``ivf``: inverted file (faiss ``IndexIVFFlat``, k-means with ``nlist`` cells, ``nprobe`` cells searched):
  sub-quadratic, approximate;
- ``hnsw``: hierarchical navigable small-world graph (faiss ``IndexHNSWFlat``, ``hnsw_m`` links,
  ``ef_search``): sub-quadratic, approximate;
- ``torch``: exact top-k of the dense score matrix with ``torch.topk`` (quadratic memory; useful on GPU,
  where faiss-cpu is not, and as the reference of the tests).

Only ``flat`` and ``torch`` return the true top-k; the lazy Gumbel sampler relies on that (its tail bound).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from common.validation import check_choice, check_int

INDEX_TYPES = ("flat", "ivf", "hnsw", "torch")
EXACT_INDEX_TYPES = ("flat", "torch")


@dataclass
class IndexOptions:
    """Index type and its parameters (defaults: nlist = 4 sqrt(Nk), nprobe = 8, hnsw_m = 32, ef_search = 64)."""
    kind: str = "flat"
    nlist: int | None = None
    nprobe: int = 8
    hnsw_m: int = 32
    ef_search: int = 64

    def __post_init__(self):
        check_choice(self.kind, "index", "knn", INDEX_TYPES)
        if self.nlist is not None:
            check_int(self.nlist, "nlist", "knn", minimum=1)
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
        nlist = min(opts.nlist or max(1, int(4 * math.sqrt(n))), n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.min_points_per_centroid = 1  # small n: no warning spam; k-means still sees every key
        index.train(keys)
        index.nprobe = min(opts.nprobe, nlist)
    else:
        index = faiss.IndexHNSWFlat(d, opts.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = opts.ef_search
    index.add(keys)
    return index


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
