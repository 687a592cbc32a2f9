"""The cheapest sampling baseline: softmax attention estimated from uniformly sampled keys.

Row i of attention is a ratio of two sums over the allowed keys j in P_i (all keys, or the causal prefix):

    out_i = sum_j exp(s_ij) v_j / sum_j exp(s_ij),     s_ij = S q_i . k_j.

Sampling l indices j_1..j_l uniformly from P_i (with replacement) and scaling both sums by |P_i| / l gives
unbiased estimates of numerator and denominator; their ratio is the self-normalised (importance sampling)
estimator, consistent but biased for finite l. It is what any smarter method has to beat.
"""
from __future__ import annotations

import math

import torch

from .attention import AttentionMethod, allowed_key_counts, gather_rows
from .registry import register
from .validation import check_int

BLOCK_BYTES = 2 ** 31  # the gathered keys and values of one block of query rows (``UniformSamplingAttention``)


@register("uniform")
class UniformSamplingAttention(AttentionMethod):
    """Self-normalised estimate of softmax attention from ``num_samples`` uniform key samples per query.

    Cost O(Nq * num_samples * D). Options: ``num_samples`` (>= 1), ``query_block`` (query rows whose samples are
    gathered at once; default None: about ``BLOCK_BYTES`` of gathered keys and values, so that memory grows like
    Nq (num_samples + D) whatever the budget), ``seed``. Output dtype = input dtype; for
    bfloat16 / float16 inputs the scores, the (max-subtracted) softmax and the weighted sum are computed in float32.

    No budget makes it exact (``exact_options`` is None): the samples are drawn with replacement, so even
    num_samples >= Nk misses keys with positive probability; the error falls as 1/sqrt(num_samples) instead.
    """

    randomized = True
    supports_lse = True

    def __init__(self, num_samples: int = 64, query_block: int | None = None, seed: int | None = None,
                 check_finite: bool = True):
        super().__init__(seed=seed, check_finite=check_finite)
        self.num_samples = check_int(num_samples, "num_samples", "uniform", minimum=1)
        self.query_block = None if query_block is None else check_int(query_block, "query_block", "uniform",
                                                                       minimum=1)

    def attend(self, q, k, v, causal, scale):
        return self._estimate(q, k, v, causal, scale, False)[0]

    def attend_lse(self, q, k, v, causal, scale):
        """(out, log of the unbiased normaliser estimate |P_i| / l sum_s e^{s_i j_s}) for ``return_lse=True``."""
        return self._estimate(q, k, v, causal, scale, True)

    def _estimate(self, q, k, v, causal, scale, return_lse):
        b, h, nq, _ = q.shape
        counts = allowed_key_counts(nq, k.shape[2], causal, q.device)
        generator = self.generator(q.device)
        # half precision: scores, softmax and the weighted sum in float32 (|q.k| overflows float16 beyond 65504)
        acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        # per query row the gathered keys and values take num_samples (D + Dv) floats: a block of rows at a time
        row_bytes = b * h * self.num_samples * (q.shape[-1] + v.shape[-1]) * (q.element_size() + 4)
        block = self.query_block or max(1, BLOCK_BYTES // row_bytes)
        out, lse = [], []
        for i in range(0, nq, block):
            rows = slice(i, i + block)
            n_allowed = counts[rows].view(1, 1, -1, 1)
            # drawn query-major, so that on the CPU the blocks' draws are those of one draw for all rows
            u = torch.rand(n_allowed.numel(), b, h, self.num_samples, generator=generator, device=q.device)
            idx = (u.permute(1, 2, 0, 3) * n_allowed).long().clamp_max(n_allowed - 1)
            k_s, v_s = gather_rows(k, idx).to(acc), gather_rows(v, idx).to(acc)
            scores = torch.einsum("bhqd,bhqsd->bhqs", q[:, :, rows].to(acc), k_s) * scale
            # The |P_i|/l factor cancels in the ratio; softmax over the samples is the self-normalised estimate.
            weights = torch.softmax(scores, dim=-1)
            out.append(torch.einsum("bhqs,bhqsv->bhqv", weights, v_s).to(q.dtype))
            if return_lse:
                lse.append(torch.logsumexp(scores, -1) + torch.log(n_allowed.squeeze(-1).to(acc) / self.num_samples))
        return torch.cat(out, dim=2), (torch.cat(lse, dim=2) if return_lse else None)

    @classmethod
    def budgets(cls, n_keys):
        root = int(math.sqrt(n_keys))
        return [{"num_samples": m} for m in sorted({max(1, root // 2), root, 4 * root})]
