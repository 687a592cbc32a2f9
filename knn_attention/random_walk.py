"""Markov-chain (random walk) estimates of products with stochastic matrices (Haris 2024, Sec. 5).

A row-stochastic matrix P (an attention matrix is one) is the transition matrix of a Markov chain on its rows,
so for any vector x

    (P^t x)_i = E[x_{J_t} | J_0 = i],      J_{s+1} ~ P[J_s, :],

and averaging x over the endpoints of W independent walks of t steps from i estimates (P^t x)_i with standard
error std(x_{J_t}) / sqrt(W). A step only needs one sample from a row of P: for attention, one lazy Gumbel sample
(``softmax_expectation.py``), i.e. O(sqrt(n)) score evaluations instead of the O(n) of a dense row, so products
with attention matrices (and their powers, as in stacked attention layers) cost O(W t sqrt(n)) per entry.

Products with the transpose, y = P^T x (the value gradient dV = A^T G of attention, Haris 2024, Sec. 5), are
estimated by walks that *start* at random rows (:func:`transpose_walk_estimate`): shift x to x' = x + sigma >= 0
(sigma = max(0, -min x)), start at row i with probability x'_i / |x'|_1, take one step j ~ P_i and histogram the
endpoints, since

    E[e_J] = sum_i (x'_i / |x'|_1) P_i   =>   P^T x' = |x'|_1 E[e_J];

the shift term sigma P^T 1 (the column sums) is estimated the same way from uniform starts, P^T 1 = n_rows E[e_J'],
and subtracted. Both histograms are unbiased, so the estimate of P^T x is unbiased for signed x; the paper takes
O(d ln n / eps) walks.
"""
from __future__ import annotations

import torch

from common.attention import allowed_key_counts
from common.validation import check_int, resolve_scale

from .index import IndexOptions, top_k_indices
from .softmax_expectation import RetrievedSet, lazy_gumbel_sample, retrieved_set


def matrix_step(transition: torch.Tensor):
    """One step of the chain of a dense row-stochastic ``transition`` (n, n): states (W,) -> next states (W,)."""
    if transition.dim() != 2 or transition.shape[0] != transition.shape[1]:
        raise ValueError(f"matrix_step: transition must be square (n, n), got {tuple(transition.shape)}")
    if (transition < 0).any() or not torch.allclose(transition.sum(1), torch.ones_like(transition[:, 0])):
        raise ValueError("matrix_step: transition must be row-stochastic (non-negative rows summing to 1)")
    return lambda states, generator: torch.multinomial(transition[states], 1, generator=generator).squeeze(1)


def attention_step(x: torch.Tensor, top_k: int, scale: float | None = None):
    """One step of the chain of A = softmax(S X X^T) (self-attention with q = k = x, x of shape (n, d)).

    The top-k set of every token is retrieved once; each step draws one lazy Gumbel sample per walker.
    """
    n, d = x.shape
    s = resolve_scale(scale, d)
    xs = x.view(1, 1, n, d)
    idx = top_k_indices(xs, xs, top_k, IndexOptions("torch"))
    top = retrieved_set(xs, xs, idx, allowed_key_counts(n, n, False, x.device), s)

    def step(states, generator):
        sub = RetrievedSet(*(t[:, :, states] for t in (top.indices, top.allowed, top.scores, top.bound,
                                                         top.counts, top.top_size)))
        return lazy_gumbel_sample(xs[:, :, states], xs, sub, 1, s, generator)[0].view(-1)

    return step


def transpose_walk_estimate(sample_rows, x: torch.Tensor, n_cols: int, walks: int,
                            generator: torch.Generator) -> torch.Tensor:
    """Unbiased estimate of P^T x from ``walks`` one-step walks per column of x plus ``walks`` walks from uniform
    starts for the shift term (module docstring), for a batch of matrices at once.

    x: (*L, n_rows, m), signed; sample_rows(rows (*L, R) long, generator) -> (*L, R), one endpoint j ~ P_row per
    entry (of the matrix of its batch entry). Returns (*L, n_cols, m).
    """
    check_int(walks, "walks", "transpose_walk_estimate", minimum=1)
    *lead, n_rows, m = x.shape
    xd = x.double().reshape(-1, n_rows, m)
    sigma = (-xd.amin(1)).clamp_min(0)  # (L, m)
    shifted = xd + sigma.unsqueeze(1)
    mass = shifted.sum(1)  # |x'|_1, (L, m)
    probs = torch.where(mass.unsqueeze(1) > 0, shifted / mass.unsqueeze(1).clamp_min(1e-300), 1.0 / n_rows)
    starts = torch.multinomial(probs.transpose(1, 2).reshape(-1, n_rows), walks, replacement=True,
                               generator=generator).view(-1, m * walks)
    uniform = torch.randint(n_rows, (starts.shape[0], walks), generator=generator, device=x.device)
    ends = sample_rows(torch.cat([starts, uniform], -1).view(*lead, (m + 1) * walks), generator)
    slot = torch.arange(m + 1, device=x.device).repeat_interleave(walks) * n_cols  # column block of each walk
    hist = torch.zeros(starts.shape[0], (m + 1) * n_cols, dtype=torch.float64, device=x.device)
    hist.scatter_add_(1, ends.reshape(starts.shape[0], -1) + slot, torch.ones_like(hist[:, :1]).expand(-1, slot.numel()))
    hist = hist.view(-1, m + 1, n_cols)
    est = hist[:, :m].transpose(1, 2) * (mass / walks).unsqueeze(1) \
        - (hist[:, m] * (n_rows / walks)).unsqueeze(-1) * sigma.unsqueeze(1)
    return est.view(*lead, n_cols, m)


def random_walk_estimate(step, x: torch.Tensor, starts: torch.Tensor, steps: int, walks: int,
                         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimate (P^steps x)[starts] from ``walks`` walks per start; returns (mean, standard error).

    x: (n,) or (n, m); starts: (S,) long. Memory O(S * walks).
    """
    check_int(steps, "steps", "random_walk_estimate", minimum=0)
    check_int(walks, "walks", "random_walk_estimate", minimum=1)
    states = starts.repeat_interleave(walks)
    for _ in range(steps):
        states = step(states, generator)
    ends = x[states].reshape(starts.numel(), walks, *x.shape[1:]).double()
    return ends.mean(1), ends.std(1) / walks ** 0.5
