"""Fast kNN attention, registered as ``knn`` (Haris 2024, Sec. 4, Alg. 2).

Each query i retrieves its top set S_i (``index.py``; k keys, k = ceil(sqrt(Nk)) by default as in the paper's
analysis), then one of four estimators of o_i = E_{j ~ softmax(s_i)}[v_j] runs:

(a) ``topk``: softmax over S_i only, renormalised: the classic kNN attention of Roy et al. (2021). Biased: the
    tail's mass is dropped.
(b) ``topk_uniform_tail``: the exact sums over S_i plus l keys sampled uniformly from the tail T_i = P_i \\ S_i,
    scaled by |T_i| / l (= (n - k) / l non-causally), for numerator and denominator alike:
        N_i = sum_{S_i} e^{s_ij} v_j + |T_i|/l sum_s e^{s_i j_s} v_{j_s},   D_i likewise with v = 1,   o_i = N_i / D_i.
    N_i and D_i are unbiased; the ratio is consistent.
(c) ``gumbel``: l exact samples of softmax(s_i) by lazy Gumbel sampling, o_i = (1/l) sum_s v_{j_s}: unbiased.
    With ``eps``/``delta`` the number of samples comes from the accuracy asked, not from n: l = g m samples,
    o_i = the median of g means of m (``softmax_expectation.median_of_means_sizes``), so that
    P(|o_hat_ic - o_ic| > eps max_j |v_jc|) <= delta. With an approximate index (``ivf``, ``hnsw``) the Gumbel
    cutoff is widened by ``tail_slack`` (default 'cauchy_schwarz', always valid) so the samples stay exact.
(d) ``adaptive``: the index retrieves up to ``k_max`` keys (default 4k); each row keeps exactly the smallest
    prefix of at least k of them, ranked by score, after which the mass that can remain outside,
    (|P_i| - |S_i|) e^{s_(|S_i|)}, is at most ``tail_ratio`` times the mass inside (all k_max if none), and samples
    the rest uniformly as in (b) (``softmax_expectation.adaptive_top_set``). Concentrated rows stop early with a
    tail whose every sampled term is at most tail_ratio / l of the inside mass; flat rows take k_max keys and an
    unbiased tail.

Causal attention: query i may only read keys j <= p_i = i + Nk - Nq. Positions are cut into blocks of
``causal_block`` tokens (default k); S_i is the top-k among the keys of the blocks before p_i's block (an index
grown block by block, ``index.causal_top_k_indices``) plus every key of its own block up to p_i, exactly; tail
samples come from the rest of the prefix. No future key is ever retrieved, scored or sampled, so the output does
not depend on future keys at all (tested by perturbing them).

Index: ``flat`` / ``ivf`` / ``hnsw`` / ``torch`` / ``ivf_torch`` (``index.py``) return per-query top-k ids, then
the estimator gathers those rows; ``torch`` (exact) and ``ivf_torch`` (approximate, non-causal) retrieve in torch on
the tensors' device, ``flat`` off the CPU is served by ``torch``, ``ivf`` / ``hnsw`` (faiss-cpu) refuse non-CPU
tensors; ``ivf_blas`` (``ivf_blocked.py``, non-causal, (a) and (b) only) takes S_i = the keys of the
probed k-means cells and evaluates the estimator cell by cell with dense matmuls, the fast path on a CPU;
``ivf_blocks`` (``block_routing.py``, causal or not, (a) and (b) only) routes blocks of queries to blocks of
cell-sorted keys and evaluates (b) (an importance-sampled tail shared by a query block) in one fused attention call
per chunk of query blocks, in the input's dtype, the fast path on a GPU.

Gradients: ``gradient='autograd'`` differentiates the estimator (a), (b) or (d) through the gathered keys (indices are
held fixed); ``gradient='sampled'`` uses the paper's sampled gradient estimators (``backward_pass.py``); the
``gumbel`` estimator only has the latter.
"""
from __future__ import annotations

import math
import warnings

import torch

from common.attention import AttentionMethod, allowed_key_counts, gather_rows, output_and_lse
from common.partial_sums import from_logits
from common.registry import register
from common.validation import check_choice, check_int

from .backward_pass import SampledGradientAttention
from .block_routing import CAUSAL_LAYOUTS, block_options, ivf_blocks_attention
from .index import (EXACT_INDEX_TYPES, IndexOptions, SearchTimes, causal_local_keys, causal_top_k_indices,
                    top_k_indices)
from .ivf_blocked import ivf_blocked_attention
from .softmax_expectation import (adaptive_top_set, expectation_estimate, lazy_gumbel_sample, median_of_means,
                                  median_of_means_sizes, retrieved_set, sample_tail_uniform)

ESTIMATORS = ("topk", "topk_uniform_tail", "gumbel", "adaptive")
# indexes that attend whole cells (no per-query lists): estimators (a) and (b) only, nprobe / nlist instead of k
CELL_INDEX_TYPES = ("ivf_blas", "ivf_blocks")
GRADIENTS = ("autograd", "sampled")
DV_ESTIMATORS = ("scatter", "walk")
# From this many keys on, the declared budgets use index='ivf_blocks' (``budgets``).
LONG_N = 16384
# Query chunk size is chosen so that a chunk's gathered keys hold about this many numbers.
_CHUNK_ELEMENTS = 2 ** 24


def default_budget(n_keys: int) -> int:
    """k = l = ceil(sqrt(n)), the paper's choice that balances retrieval and sampling (Haris 2024, Thm. 4.2)."""
    return max(1, math.ceil(math.sqrt(n_keys)))


def ivf_blocks_budgets(n_keys: int) -> list[dict]:
    """Three budgets of ``index='ivf_blocks'``: each query block reads about 2, 4 or 8 sqrt(n) exact keys (whole
    key blocks of ``block_routing.block_options(n).block`` keys) plus l = sqrt(n)/2, sqrt(n), 2 sqrt(n) tail
    draws."""
    root, block = default_budget(n_keys), block_options(n_keys).block
    return [{"index": "ivf_blocks", "nprobe": math.ceil(m * root / block), "num_samples": max(1, l)}
            for m, l in ((2, root // 2), (4, root), (8, 2 * root))]


@register("knn")
class KNNAttention(AttentionMethod):
    """kNN attention with a faiss top-k set and one of four estimators (see the module docstring); the default is
    (d) ``adaptive`` ((b) with ``index='ivf_blas'``).

    Options: k (top set size, default ceil(sqrt(Nk))), num_samples (l, default ceil(sqrt(Nk))), estimator,
    index ('flat' | 'ivf' | 'ivf_blas' | 'hnsw' | 'torch' | 'ivf_torch' | 'ivf_blocks') with nlist, nprobe, hnsw_m,
    ef_search, cell_size ('ivf_torch'; the block size of 'ivf_blocks'), causal_block,
    tail_block (queries sharing tail draws with 'ivf_blas'), gradient ('autograd' | 'sampled'), eps and delta
    (median of means for 'gumbel'), tail_slack (widened Gumbel cutoff), k_max and tail_ratio ('adaptive'),
    dv_estimator ('scatter' | 'walk': dV of gradient='sampled' by the paper's random walks, ``dv_walks`` per column
    of G, default l Nq), causal_layout ('segments' | 'mask': the causal layout of 'ivf_blocks', ``block_routing``;
    causal_block is then its segment), static_shapes (lazy Gumbel sampling without host reads; default: off the
    CPU; ``softmax_expectation.lazy_gumbel_sample``), seed.
    Half precision (float16, bfloat16) is computed in float32 (:meth:`attend`).
    ``last_times`` holds the index build / search seconds of the last call.
    """

    randomized = True
    supports_lse = True

    def __init__(self, k: int | None = None, num_samples: int | None = None, estimator: str | None = None,
                 index: str = "flat", nlist: int | None = None, nprobe: int | None = None, hnsw_m: int = 32,
                 ef_search: int = 64, causal_block: int | None = None, tail_block: int = 64,
                 gradient: str | None = None, eps: float | None = None, delta: float = 0.05,
                 tail_slack: float | str | None = None, k_max: int | None = None, tail_ratio: float = 0.05,
                 dv_estimator: str = "scatter", dv_walks: int | None = None, cell_size: int | None = None,
                 causal_layout: str = "segments", static_shapes: bool | None = None, seed: int | None = None,
                 check_finite: bool = True):
        super().__init__(seed=seed, check_finite=check_finite)
        self.k = None if k is None else check_int(k, "k", "knn", minimum=1)
        self.num_samples = None if num_samples is None else check_int(num_samples, "num_samples", "knn", minimum=1)
        # the default: (d) adaptive; 'ivf_blas' and 'ivf_blocks' have no per-query lists to adapt, so (b) there
        estimator = estimator or ("topk_uniform_tail" if index in CELL_INDEX_TYPES else "adaptive")
        self.estimator = check_choice(estimator, "estimator", "knn", ESTIMATORS)
        self.index = index
        self.index_options = IndexOptions(index, nlist, nprobe, hnsw_m, ef_search, cell_size)
        if index in CELL_INDEX_TYPES and k is not None:
            raise ValueError(f"knn: index={index!r} retrieves whole cells (|S_i| = the keys of the nprobe probed "
                             "cells, about nprobe * Nk / nlist); set nprobe and nlist instead of k")
        self.causal_block = None if causal_block is None else check_int(causal_block, "causal_block", "knn", minimum=1)
        self.causal_layout = check_choice(causal_layout, "causal_layout", "knn", CAUSAL_LAYOUTS)
        if causal_layout != "segments" and index != "ivf_blocks":
            raise ValueError(f"knn: causal_layout={causal_layout!r} is an option of index='ivf_blocks' only")
        self.tail_block = check_int(tail_block, "tail_block", "knn", minimum=1)
        self.gradient = check_choice(gradient or ("sampled" if estimator == "gumbel" else "autograd"),
                                     "gradient", "knn", GRADIENTS)
        if self.estimator == "gumbel" and self.gradient == "autograd":
            raise ValueError("knn: estimator='gumbel' has no autograd gradient (samples are discrete); "
                             "use gradient='sampled'")
        self.eps, self.delta = eps, delta
        if eps is not None:
            if not 0 < eps < 1 or not 0 < delta < 1:
                raise ValueError(f"knn: eps and delta must lie in (0, 1), got eps={eps!r}, delta={delta!r}")
            if estimator != "gumbel" or num_samples is not None:
                raise ValueError("knn: eps/delta set the number of samples of estimator='gumbel' (median of means); "
                                 "use them with estimator='gumbel' and without num_samples")
        needs_lists = self.estimator == "gumbel" or self.gradient == "sampled" or self.estimator == "adaptive"
        if needs_lists and index in CELL_INDEX_TYPES:
            raise ValueError(f"knn: estimator={estimator!r} / gradient={self.gradient!r} needs per-query top-k lists; "
                             f"index={index!r} has none (use 'flat', 'torch', 'hnsw' or 'ivf')")
        if tail_slack is None:
            tail_slack = 0.0 if index in EXACT_INDEX_TYPES else "cauchy_schwarz"
        if tail_slack != "cauchy_schwarz" and not (isinstance(tail_slack, (int, float)) and tail_slack >= 0):
            raise ValueError(f"knn: tail_slack must be a number >= 0 or 'cauchy_schwarz', got {tail_slack!r}")
        self.tail_slack = tail_slack
        self.k_max = None if k_max is None else check_int(k_max, "k_max", "knn", minimum=1)
        if not tail_ratio > 0:
            raise ValueError(f"knn: tail_ratio must be > 0, got {tail_ratio!r}")
        self.tail_ratio = tail_ratio
        self.dv_estimator = check_choice(dv_estimator, "dv_estimator", "knn", DV_ESTIMATORS)
        self.dv_walks = None if dv_walks is None else check_int(dv_walks, "dv_walks", "knn", minimum=1)
        self.static_shapes = static_shapes
        self.last_times = SearchTimes()
        self._warned_clamp = False

    # --- the estimators on a chunk of queries ---------------------------------------------------
    def _estimate(self, q, k, v, hits, counts, local, num, scale, return_lse=False, static_ratio=None):
        top = retrieved_set(q, k, hits, counts, scale, local)
        gen = self.generator(q.device)
        if self.estimator == "gumbel":
            samples = lazy_gumbel_sample(q, k, top, num, scale, gen, self.tail_slack, static_ratio)[0]
            if self.eps is not None:
                return median_of_means(v, samples, median_of_means_sizes(self.eps, self.delta)[0])
            return expectation_estimate(v, samples)
        if self.estimator == "adaptive":
            top = adaptive_top_set(top, hits.shape[-1], self._k_min, self.tail_ratio)
        v_top = gather_rows(v, top.indices)
        if self.estimator == "topk":
            if return_lse:  # the normaliser over the retrieved keys (all of them under exact options)
                return output_and_lse(from_logits(top.scores, v_top, "bhqk,bhqkv->bhqv"), q.dtype)
            return torch.einsum("bhqk,bhqkv->bhqv", torch.softmax(top.scores, -1), v_top)
        tail_idx = sample_tail_uniform(top, num, gen)
        tail_scores = torch.einsum("bhqd,bhqsd->bhqs", q, gather_rows(k, tail_idx)) * scale
        # log(|T_i| / l) added to the tail scores is the (n - k)/l weight; -inf drops an empty tail.
        log_w = torch.log(top.tail_size.to(q.dtype) / num).unsqueeze(-1)
        exact_part = from_logits(top.scores, v_top, "bhqk,bhqkv->bhqv")
        tail_part = from_logits(tail_scores + log_w, gather_rows(v, tail_idx), "bhqs,bhqsv->bhqv")
        sums = exact_part.merge(tail_part)
        return output_and_lse(sums, q.dtype) if return_lse else sums.output()

    def _samples(self, q, k, hits, counts, local, num, scale, rows=None, static_ratio=None):
        """l samples of every query's softmax row, or one sample of each query in ``rows`` (B, H, R); the static
        layout of lazy Gumbel sampling with ``static_ratio`` (see :meth:`_attend`)."""
        top = retrieved_set(q, k, hits, counts, scale, local)
        if rows is not None:
            q, top, num = q.gather(2, rows.unsqueeze(-1).expand(-1, -1, -1, q.shape[-1])), top.select(rows), 1
        return lazy_gumbel_sample(q, k, top, num, scale, self.generator(q.device), self.tail_slack,
                                  static_ratio)[0]

    def _attend_ivf_blocked(self, q, k, v, num, scale):
        nlist = self.index_options.nlist or 4 * default_budget(k.shape[2])
        gen, seed = self.generator(q.device), 0 if self.seed is None else self.seed
        return torch.stack([torch.stack([
            ivf_blocked_attention(q[b, h], k[b, h], v[b, h], scale, num, self.estimator != "topk", nlist,
                                  self.index_options.nprobe, self.tail_block, gen, seed, self.last_times)
            for h in range(q.shape[1])]) for b in range(q.shape[0])])

    def _budgets(self, nk: int) -> tuple[int, int]:
        """(k, l) for Nk keys: the defaults ceil(sqrt(Nk)), or the options, k clamped to Nk when larger (e.g. k = 8
        while decoding after a 6-token prompt) with one warning per instance (contract: budgets clamp, never
        crash). l is not clamped: samples are drawn with replacement, so any l is valid (and l > Nk still lowers
        the variance)."""
        if self.k is not None and self.k > nk and not self._warned_clamp:
            warnings.warn(f"knn: k={self.k} is larger than the number of keys Nk={nk}; using k={nk} (budgets are "
                          "clamped to the keys available; warned once per instance)", stacklevel=4)
            self._warned_clamp = True
        top_k = default_budget(nk) if self.k is None else min(self.k, nk)
        if self.eps is not None:
            groups, per_group = median_of_means_sizes(self.eps, self.delta)
            return top_k, groups * per_group
        return top_k, default_budget(nk) if self.num_samples is None else self.num_samples

    def _attend_ivf_blocks(self, q, k, v, causal, scale):
        nk = k.shape[2]
        num = (0 if self.estimator == "topk" else
               self.num_samples if self.num_samples is not None else default_budget(nk))
        opts = block_options(nk, self.index_options.nlist, self.index_options.nprobe, self.index_options.cell_size,
                             num, self.causal_block, self.causal_layout)
        # as 'ivf_torch': k-means from its own stream seeded with `seed` (0 if None), the same cells every call
        return ivf_blocks_attention(q, k, v, causal, scale, opts, self.generator(q.device),
                                    0 if self.seed is None else self.seed)

    def attend(self, q, k, v, causal, scale):
        """float16 / bfloat16 inputs are attended in float32 (scores, exponentials, normalisers and the
        max-subtracted sums of ``common.partial_sums`` all in float32; the index is float32 anyway) and the output
        is cast back to the input's dtype, as SDPA returns it. ``ivf_blocks`` keeps the input's dtype: its fused
        attention kernel accumulates in float32 itself (``block_routing.py``)."""
        if self.index == "ivf_blocks":
            return self._attend_ivf_blocks(q, k, v, causal, scale)
        if q.dtype in (torch.float16, torch.bfloat16):
            return self._attend(q.float(), k.float(), v.float(), causal, scale).to(q.dtype)
        return self._attend(q, k, v, causal, scale)

    def attend_lse(self, q, k, v, causal, scale):
        """(out, log of the estimated normaliser: the retrieved keys' exact sum plus the weighted tail, unbiased;
        (a) the retrieved keys' sum) for ``return_lse=True``; not for 'gumbel' (it samples, forming no normaliser)
        nor for the indexes without per-query lists ('ivf_blas', 'ivf_blocks')."""
        if self.estimator == "gumbel" or self.index in ("ivf_blas", "ivf_blocks"):
            raise ValueError(f"knn: return_lse=True is not supported with estimator={self.estimator!r}, "
                             f"index={self.index!r} (no normaliser is formed); use estimator 'adaptive', 'topk' or "
                             "'topk_uniform_tail' with index 'flat', 'torch', 'hnsw', 'ivf' or 'ivf_torch'")
        if q.dtype in (torch.float16, torch.bfloat16):
            out, lse = self._attend(q.float(), k.float(), v.float(), causal, scale, return_lse=True)
            return out.to(q.dtype), lse
        return self._attend(q, k, v, causal, scale, return_lse=True)

    def _attend(self, q, k, v, causal, scale, return_lse=False):
        nq, nk, d = q.shape[2], k.shape[2], q.shape[3]
        top_k, num = self._budgets(nk)
        self._k_min = top_k
        if self.estimator == "adaptive":  # the index retrieves up to k_max; each row keeps what it needs
            top_k = min(nk, self.k_max or 4 * top_k)
        self.last_times = SearchTimes()
        if self.index == "ivf_blas":
            if causal:
                raise ValueError("knn: index='ivf_blas' is not available with causal=True (its k-means cells are "
                                 "built from all keys, future ones included); use 'flat', 'hnsw' or 'torch'")
            return self._attend_ivf_blocked(q, k, v, num, scale)
        static = self.static_shapes if self.static_shapes is not None else q.device.type != "cpu"
        gumbel = self.estimator == "gumbel" or self.gradient == "sampled"
        if static and gumbel and self.index not in EXACT_INDEX_TYPES:
            raise ValueError(f"knn: estimator={self.estimator!r} / gradient={self.gradient!r} with static shapes "
                             f"(the default off the CPU) needs an exact index ('torch' or 'flat'), got "
                             f"index={self.index!r}: the widened Gumbel cutoff of an approximate index lets up to the "
                             "whole tail beat it, so no static candidate capacity short of the tail is exact "
                             "(README, 'Host synchronisation'); use index='torch', or CPU tensors")
        # lazy Gumbel sampling with static shapes: |T_i| / h_i <= (Nk - k) / k for these exact indexes (a row with
        # fewer hits has retrieved its whole prefix outside its own block: an empty tail)
        ratio = (nk - top_k) / top_k if static and gumbel else None
        counts = allowed_key_counts(nq, nk, causal, q.device)
        local = None
        if causal:
            block = self.causal_block or top_k
            hits = causal_top_k_indices(q, k, top_k, block, self.index_options, self.last_times)
            local = causal_local_keys(nq, nk, block, q.device)
        else:
            # 'ivf_torch' k-means draws from its own stream seeded with `seed` (0 if None), not from the method's
            # generator: the estimator's draws do not depend on the index, and each call builds the same cells
            hits = top_k_indices(q, k, top_k, self.index_options, self.last_times,  # one index per call
                                 seed=0 if self.seed is None else self.seed)
        width = top_k + (0 if local is None else local.shape[1])
        chunk = max(1, _CHUNK_ELEMENTS // (q.shape[0] * q.shape[1] * (width + num) * d))
        sampled = self.gradient == "sampled" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if sampled and return_lse:
            raise ValueError("knn: return_lse=True is not supported with gradient='sampled' on inputs that require "
                             "grad (the sampled backward returns the output only)")
        outs = []
        for start in range(0, nq, chunk):
            sl = slice(start, start + chunk)
            qc, hc, cc, lc = q[:, :, sl], hits[:, :, sl], counts[sl], None if local is None else local[sl]
            if sampled:
                outs.append(SampledGradientAttention.apply(
                    qc, k, v, lambda a, b, c, hc=hc, cc=cc, lc=lc: self._estimate(a, b, c, hc, cc, lc, num, scale,
                                                                                  static_ratio=ratio),
                    lambda a, b, rows=None, hc=hc, cc=cc, lc=lc: self._samples(a, b, hc, cc, lc, num, scale, rows,
                                                                                ratio),
                    scale, None if self.dv_estimator == "scatter" else self.dv_walks or num * qc.shape[2],
                    self.generator(q.device)))
            else:
                outs.append(self._estimate(qc, k, v, hc, cc, lc, num, scale, return_lse, ratio))
        if return_lse:
            return torch.cat([o for o, _ in outs], dim=2), torch.cat([lse for _, lse in outs], dim=2)
        return torch.cat(outs, dim=2)

    @classmethod
    def exact_options(cls, n_keys: int) -> dict:
        """k = Nk with estimator (a): every key is retrieved (exact ``torch`` top-k), the softmax over S_i = P_i
        is the exact row (equal to exact attention up to rounding; tested to 1e-6 in float64)."""
        return {"k": n_keys, "estimator": "topk", "index": "torch"}

    @classmethod
    def budgets(cls, n_keys):
        """k = l = sqrt(n)/2, sqrt(n), 4 sqrt(n) with the default index; from ``LONG_N`` keys on,
        :func:`ivf_blocks_budgets` (on any device; a long-n GPU run is what they are for)."""
        if n_keys >= LONG_N:
            return ivf_blocks_budgets(n_keys)
        root = default_budget(n_keys)
        return [{"k": min(n_keys, max(1, root // 2)), "num_samples": max(1, root // 2)},
                {"k": root, "num_samples": root},
                {"k": min(n_keys, 4 * root), "num_samples": 4 * root}]
