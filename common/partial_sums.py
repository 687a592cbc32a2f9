"""Attention as a ratio of two sums, kept in a numerically safe, mergeable form.

Many approximations add up pieces of the numerator N_i = sum_j w_ij e^{s_ij} v_j and the denominator
D_i = sum_j w_ij e^{s_ij} over different key sets (an exact block, a sampled residual, the two halves of a causal
split, the rounds of an LSH scheme); the output is N_i / D_i. Each piece is stored as (num, den, shift) with
N = num * e^shift and D = den * e^shift, shift being the largest logit of the piece, so nothing overflows; two
pieces merge by rescaling to the larger shift (the same trick as the online softmax of FlashAttention).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PartialSums:
    """num (B, H, Nq, Dv), den (B, H, Nq), shift (B, H, Nq): N = num e^shift, D = den e^shift."""
    num: torch.Tensor
    den: torch.Tensor
    shift: torch.Tensor

    def merge(self, other: "PartialSums") -> "PartialSums":
        """The sums over the union of both key sets (they must be disjoint)."""
        shift = torch.maximum(self.shift, other.shift)
        a = torch.exp(self.shift - shift).nan_to_num(0.0)  # an empty piece has shift -inf
        b = torch.exp(other.shift - shift).nan_to_num(0.0)
        return PartialSums(self.num * a.unsqueeze(-1) + other.num * b.unsqueeze(-1),
                           self.den * a + other.den * b, shift)

    @staticmethod
    def empty(query_shape: tuple, dv: int, like: torch.Tensor) -> "PartialSums":
        """The sums over no key at all (N = D = 0, shift -inf) for queries of shape ``query_shape``, e.g.
        (B, H, Nq); dtype and device follow ``like``. Merging anything into it gives that thing."""
        return PartialSums(like.new_zeros(*query_shape, dv), like.new_zeros(query_shape),
                           like.new_full(query_shape, float("-inf")))

    def map_queries(self, fn) -> "PartialSums":
        """Apply ``fn`` to the query dimensions of all three parts at once.

        ``fn`` takes a tensor (*Q, C) and rearranges its query dimensions *Q only: a reshape of them, a slice, a
        row gather or an un-sort. It sees num as (*Q, Dv) and den, shift as (*Q, 1), so one lambda such as
        ``lambda t: t.view(b, h, -1, t.shape[-1])`` or ``lambda t: t[:, :, :n]`` serves all three.
        """
        return PartialSums(fn(self.num), fn(self.den.unsqueeze(-1)).squeeze(-1),
                           fn(self.shift.unsqueeze(-1)).squeeze(-1))

    def output(self) -> torch.Tensor:
        """N / D."""
        return self.num / self.den.unsqueeze(-1)

    @staticmethod
    def cat(parts: list["PartialSums"], dim: int = 2) -> "PartialSums":
        """Stack pieces of different queries along the query dimension."""
        return PartialSums(torch.cat([p.num for p in parts], dim), torch.cat([p.den for p in parts], dim),
                           torch.cat([p.shift for p in parts], dim))


def from_logits(logits: torch.Tensor, values: torch.Tensor, equation: str = "bhqk,bhkv->bhqv") -> PartialSums:
    """PartialSums of sum_j e^{logits_ij} values_j; logits may hold -inf (excluded terms) and log-weights.

    ``equation`` contracts the weights with the values (default: shared keys; use e.g.
    "bhqs,bhqsv->bhqv" for per-query sampled values).
    """
    shift = logits.amax(-1).detach()
    safe = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    weights = torch.exp(logits - safe.unsqueeze(-1))
    return PartialSums(torch.einsum(equation, weights, values), weights.sum(-1), safe.masked_fill(
        ~torch.isfinite(shift), float("-inf")))
